"""The seed page's agents registered by name, for the distributed runtime: the module that both the
producer (the tests) and the workers (``TOKENMILL_AGENT_MODULES``) import."""

from __future__ import annotations

from agents import agent_type
from models import ChatCompletionClient
from tests.agents.seed_example import SimpleAgent, SimpleAgentWithContext


@agent_type("simple_agent", SimpleAgent)
def simple_agent(model_client: ChatCompletionClient) -> SimpleAgent:
    return SimpleAgent(model_client=model_client)


@agent_type("ctx_agent", SimpleAgentWithContext)
def ctx_agent(model_client: ChatCompletionClient) -> SimpleAgentWithContext:
    return SimpleAgentWithContext(model_client)
