"""A LangGraph ReAct agent: LangChain's `create_agent` (the LangGraph 1.x successor of
`langgraph.prebuilt.create_react_agent`, which is deprecated) builds the model -> tools -> model
graph around `langchain_openai.ChatOpenAI` and one `@tool`, a calculator. Reward 1.0 when the
final answer is the task's number.

Tasks (sums.jsonl): {"question": "What is 82 * 98 + 13?", "answer": "8049"}.

    pip install 'lightloop[examples]'
    lightloop tasks load examples/sums.jsonl --dataset sums
    lightloop run examples/langgraph_react.py:agent --dataset sums

ChatOpenAI only needs the rollout's base URL: LangChain sends Chat Completions requests there and
the proxy records each of them as this rollout's. ModelCallLimitMiddleware ends the run after
MAX_MODEL_CALLS calls, so a model that keeps calling the tool cannot loop forever.
"""

import ast
import operator
import re

from langchain.agents import create_agent
from langchain.agents.middleware import ModelCallLimitMiddleware
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from lightloop.llm import LLM

MAX_MODEL_CALLS = 3
SYSTEM = "You are good at arithmetic. Use the calculator tool, then reply with the number only."
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


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression such as '17 * 23 + 4'."""
    return calculate(expression)


def agent(task: dict, llm: LLM) -> float:
    model = ChatOpenAI(
        base_url=llm.base_url,
        api_key=llm.api_key,
        model=llm.model,
        default_headers=llm.headers,
        max_tokens=64,
    )
    graph = create_agent(
        model,
        tools=[calculator],
        system_prompt=SYSTEM,
        middleware=[ModelCallLimitMiddleware(run_limit=MAX_MODEL_CALLS, exit_behavior="end")],
    )
    state = graph.invoke({"messages": [{"role": "user", "content": task["question"]}]})
    return score(state["messages"][-1].text, task["answer"])
