"""``GET /v1/models`` and ``GET /v1/models/{model}``: the models this service is set up for.

Those are the default model, the models with global limits (``TOKENMILL_LIMITS``) and the priced
ones (seeded by the migrations, changed with ``tokenmill prices set``), so a caller can see which names
get limits and a cost in ``/v1/usage``. Other names are still forwarded upstream, which answers for
them (an unknown one fails per request with the provider's ``model_not_found``); this list never
asks the provider.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Path
from sqlalchemy.engine import Engine

import store
from api.deps import EngineDep, SettingsDep, TenantDep
from api.errors import NotFound
from config import Settings

__all__ = ["router"]

router = APIRouter(tags=["models"])
_OWNER = "tokenmill"


def _catalog(settings: Settings, engine: Engine) -> dict[str, int]:
    """Model name -> created (unix seconds: when its price was set, else 0)."""
    catalog = {settings.default_model: 0, **dict.fromkeys(settings.limits, 0)}
    for name, price in store.get_prices(engine).items():
        catalog[name] = int(price.updated_at)
    return catalog


def _model(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": _OWNER}


@router.get("/v1/models")
def list_models(tenant: TenantDep, engine: EngineDep, settings: SettingsDep) -> dict[str, Any]:
    del tenant  # any tenant's key; the list is the service's
    catalog = _catalog(settings, engine)
    return {"object": "list", "data": [_model(name, catalog[name]) for name in sorted(catalog)]}


@router.get("/v1/models/{model:path}")
def retrieve_model(
    tenant: TenantDep,
    engine: EngineDep,
    settings: SettingsDep,
    model: str = Path(max_length=256),
) -> dict[str, Any]:
    del tenant
    catalog = _catalog(settings, engine)
    if model not in catalog:
        raise NotFound(f"The model '{model}' does not exist", param="model", code="model_not_found")
    return _model(model, catalog[model])
