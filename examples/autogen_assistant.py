"""AutoGen AgentChat: an `AssistantAgent` with one tool, a calculator, on autogen-ext's
`OpenAIChatCompletionClient` pointed at the rollout's base URL. Reward 1.0 when the agent's last
message is the task's number.

Tasks (sums.jsonl): {"question": "What is 82 * 98 + 13?", "answer": "8049"}.

    pip install 'lightloop[examples]'
    lightloop tasks load examples/sums.jsonl --dataset sums
    lightloop run examples/autogen_assistant.py:agent --dataset sums

A model that AutoGen does not know by name needs `model_info` (what the model can do). The agent
alternates model calls and tool calls up to MAX_TOOL_ITERATIONS times and stops at the first
reply without a tool call; its last message, that reply or else the last tool output, is scored.
"""

import logging
import warnings

from autogen_agentchat.agents import AssistantAgent
from autogen_core import EVENT_LOGGER_NAME
from autogen_ext.models.openai import OpenAIChatCompletionClient

# The same safe calculator and scoring as the plain-SDK example beside this file.
from calculator_tool import calculate, score

from lightloop.llm import LLM

MAX_TOOL_ITERATIONS = 3
SYSTEM = "You are good at arithmetic. Use the calculator tool, then reply with the number only."
# Replies name the model that served them (the base model), not the name asked for (the policy).
warnings.filterwarnings("ignore", message="Resolved model mismatch")
# AutoGen logs every request and response in full at INFO; lightloop records them already.
logging.getLogger(EVENT_LOGGER_NAME).setLevel(logging.WARNING)


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression such as '17 * 23 + 4'."""
    return calculate(expression)


async def agent(task: dict, llm: LLM) -> float:
    client = OpenAIChatCompletionClient(
        model=llm.model,
        base_url=llm.base_url,
        api_key=llm.api_key,
        default_headers=llm.headers,
        max_tokens=64,
        model_info={
            "vision": False,
            "function_calling": True,
            "json_output": False,
            "family": "unknown",
            "structured_output": False,
        },
    )
    assistant = AssistantAgent(
        "calculator",
        model_client=client,
        tools=[calculator],
        system_message=SYSTEM,
        max_tool_iterations=MAX_TOOL_ITERATIONS,
    )
    try:
        result = await assistant.run(task=task["question"])
    finally:
        await client.close()
    return score(result.messages[-1].to_text(), task["answer"])
