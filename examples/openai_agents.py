"""The OpenAI Agents SDK: an `Agent` with a `function_tool` calculator, run by `Runner.run` on
`OpenAIChatCompletionsModel` over the rollout's `AsyncOpenAI` client. Reward 1.0 when the final
output is the task's number.

Tasks (sums.jsonl): {"question": "What is 82 * 98 + 13?", "answer": "8049"}.

    pip install 'lightloop[examples]'
    lightloop tasks load examples/sums.jsonl --dataset sums
    lightloop run examples/openai_agents.py:agent --dataset sums

The SDK's own tracing uploads to OpenAI; lightloop records the calls already, so it is turned off.
A model that misbehaves (calls a tool that does not exist, or keeps calling tools past MAX_TURNS)
scores 0 instead of failing the rollout.
"""

import ast
import operator
import re

from agents import (
    Agent,
    MaxTurnsExceeded,
    ModelBehaviorError,
    ModelSettings,
    OpenAIChatCompletionsModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)

from lightloop.llm import LLM

MAX_TURNS = 3
SYSTEM = "You are good at arithmetic. Use the calculator tool, then reply with the number only."
set_tracing_disabled(True)

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


@function_tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression such as '17 * 23 + 4'."""
    return calculate(expression)


async def agent(task: dict, llm: LLM) -> float:
    async with llm.async_openai() as client:
        assistant = Agent(
            name="calculator",
            instructions=SYSTEM,
            tools=[calculator],
            model=OpenAIChatCompletionsModel(model=llm.model, openai_client=client),
            model_settings=ModelSettings(max_tokens=64),
        )
        try:
            result = await Runner.run(assistant, task["question"], max_turns=MAX_TURNS)
        except (MaxTurnsExceeded, ModelBehaviorError):
            return 0.0
    return score(str(result.final_output), task["answer"])
