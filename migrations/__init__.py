"""Alembic migrations of the ledger (``tokenmill db upgrade``); run through ``store.schema``."""
