"""The ``openai`` and ``azure`` providers: their clients built from a model name and the provider
options (``models.providers``), credentials from the SDK's own environment variables."""

from __future__ import annotations

from models.base import ChatCompletionClient
from models.openai.client import AzureOpenAIChatCompletionClient, OpenAIChatCompletionClient
from models.providers import ProviderOptions

__all__ = ["azure_client", "openai_client"]


def openai_client(model: str, options: ProviderOptions) -> ChatCompletionClient:
    """OpenAI; Gemini for ``gemini-*`` models when no ``OPENAI_BASE_URL`` is set; any
    OpenAI-compatible server at ``OPENAI_BASE_URL``. Key: ``OPENAI_API_KEY`` (``GEMINI_API_KEY``)."""
    return OpenAIChatCompletionClient(
        model=model,
        base_url=options.env.get("OPENAI_BASE_URL"),
        api_key=options.env.get("OPENAI_API_KEY"),
        timeout=options.timeout,
    )


def azure_client(model: str, options: ProviderOptions) -> ChatCompletionClient:
    """Azure OpenAI: ``AZURE_OPENAI_ENDPOINT``, ``OPENAI_API_VERSION``, ``AZURE_OPENAI_API_KEY``;
    the deployment is named as the model."""
    return AzureOpenAIChatCompletionClient(
        model=model,
        azure_endpoint=options.env.get("AZURE_OPENAI_ENDPOINT"),
        api_version=options.env.get("OPENAI_API_VERSION"),
        api_key=options.env.get("AZURE_OPENAI_API_KEY"),
        timeout=options.timeout,
    )
