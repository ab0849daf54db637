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

import ast
import logging
import operator
import re
import warnings

from autogen_agentchat.agents import AssistantAgent
from autogen_core import EVENT_LOGGER_NAME
from autogen_ext.models.openai import OpenAIChatCompletionClient

from lightloop.llm import LLM

MAX_TOOL_ITERATIONS = 3
SYSTEM = "You are good at arithmetic. Use the calculator tool, then reply with the number only."
# Replies name the model that served them (the base model), not the name asked for (the policy).
warnings.filterwarnings("ignore", message="Resolved model mismatch")
# AutoGen logs every request and response in full at INFO; lightloop records them already.
logging.getLogger(EVENT_LOGGER_NAME).setLevel(logging.WARNING)
OPERATORS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
    ast.USub: operator.neg, ast.UAdd: operator.pos,
}  # fmt: skip


def calculate(expression: str) -> str:
    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in OPERATORS:
            return OPERATORS[type(node.op)](value(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent too large")
            result = OPERATORS[type(node.op)](left, right)
            if abs(result) > 1e100:
                raise ValueError("number too large")
            return result
        raise ValueError("only numbers and + - * / // % ** are allowed")

    try:
        return str(value(ast.parse(str(expression)[:200], mode="eval").body))
    except (SyntaxError, ValueError, ArithmeticError, RecursionError) as e:
        return f"error: {e}"


def score(reply: str | None, answer: str) -> float:
    numbers = re.findall(r"-?\d+(?:\.\d+)?", (reply or "").replace(",", ""))
    return 1.0 if numbers and float(numbers[-1]) == float(answer) else 0.0


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
