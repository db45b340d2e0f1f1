"""The batch dashboard (``/ui``): server-rendered pages behind the same API keys.

A browser logs in once with an API key (``sessions``) and holds an opaque session token in a
``Secure; HttpOnly; SameSite=Strict`` cookie, never the key. Pages (``pages``) read the ledger
through ``store.dashboard`` only; charts are inline SVG drawn by our own code (``charts``), so
the pages need no script but the small progress poller served beside them. Every page carries a
strict Content-Security-Policy (scripts and styles from this origin only, no inline script), and
every value a tenant chose (metadata, custom ids, model names, error messages) goes through
Jinja2's autoescaping.
"""

from api.dashboard.pages import router

__all__ = ["router"]
