"""The seed page's agents registered by name, for the distributed runtime: the module that both the
producer (the tests) and the workers (``TOKENMILL_AGENT_MODULES``) import."""

from __future__ import annotations

import time
from dataclasses import dataclass

from agents import MessageContext, RoutedAgent, agent_type, message_handler
from models import ChatCompletionClient
from tests.agents.seed_example import SimpleAgent, SimpleAgentWithContext


@agent_type("simple_agent", SimpleAgent)
def simple_agent(model_client: ChatCompletionClient) -> SimpleAgent:
    return SimpleAgent(model_client=model_client)


@agent_type("ctx_agent", SimpleAgentWithContext)
def ctx_agent(model_client: ChatCompletionClient) -> SimpleAgentWithContext:
    return SimpleAgentWithContext(model_client)


@dataclass
class Block:
    """Hold the worker's event loop for ``seconds``, as a synchronous tool would."""

    seconds: float


class BlockingAgent(RoutedAgent):
    def __init__(self) -> None:
        super().__init__("An agent whose tool blocks the event loop")

    @message_handler
    async def handle_block(self, message: Block, ctx: MessageContext) -> Block:
        time.sleep(message.seconds)  # noqa: ASYNC251 - the point: nothing else on this loop runs
        return message


@agent_type("blocking_agent", BlockingAgent)
def blocking_agent(model_client: ChatCompletionClient) -> BlockingAgent:
    return BlockingAgent()
