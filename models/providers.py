"""Model providers by name: each turns a model name into a chat-completion client.

The registry is the table in ``_providers`` at the bottom, the one place that lists them: a new
provider (say Anthropic) is its client's package under ``models/`` with a factory beside it, plus
one entry there. The workers pick one by name (``TOKENMILL_PROVIDER``).

Credentials and endpoints are read where each client is built, from the provider's own
environment variables (``OPENAI_API_KEY``, ``AZURE_OPENAI_ENDPOINT``, ...); ``ProviderOptions.env``
overrides some of them for one factory (the embedded run points ``OPENAI_BASE_URL`` at the bundled
simulator this way).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from models.base import ChatCompletionClient

__all__ = [
    "ProviderFactory",
    "ProviderOptions",
    "UnknownProvider",
    "provider_client_factory",
    "provider_names",
]


@dataclass(frozen=True)
class ProviderOptions:
    """What a provider builds its clients from, besides the model name."""

    timeout: float = 600.0
    # Values of the provider's environment variables that win over the process environment.
    env: Mapping[str, str] = field(default_factory=dict)


ProviderFactory = Callable[[str, ProviderOptions], ChatCompletionClient]


class UnknownProvider(ValueError):
    """No provider is registered under the name asked for."""


def provider_names() -> list[str]:
    return sorted(_providers())


def provider_client_factory(name: str, options: ProviderOptions) -> Callable[[str], ChatCompletionClient]:
    """The client factory (model name -> client) of provider ``name``; raises ``UnknownProvider``
    at once, not at the first model call."""
    providers = _providers()
    factory = providers.get(name)
    if factory is None:
        raise UnknownProvider(f"unknown model provider {name!r}: known are {', '.join(sorted(providers))}")

    def make(model: str) -> ChatCompletionClient:
        return factory(model, options)

    return make


def _providers() -> Mapping[str, ProviderFactory]:
    # Imported here: each provider's package imports ProviderOptions from this module.
    from models.openai.providers import azure_client, openai_client

    return {"openai": openai_client, "azure": azure_client}
