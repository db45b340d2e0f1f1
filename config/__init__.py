"""tokenmill's settings, read from ``TOKENMILL_*`` environment variables: one neutral module that
the API, the workers, the store's callers and the commands all import cheaply (it loads pydantic
and nothing of Celery, SQLAlchemy or the openai SDK)."""

from config.settings import ModelLimits, Settings, get_settings, url_with_password

__all__ = ["ModelLimits", "Settings", "get_settings", "url_with_password"]
