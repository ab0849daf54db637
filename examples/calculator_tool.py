"""A multi-turn, tool-using agent on the plain `openai` SDK: the model may call a `calculator`
tool (function calling) for up to MAX_TURNS turns before it answers; reward 1.0 when its final
answer is the task's number.

Tasks (sums.jsonl): {"question": "What is 82 * 98 + 13?", "answer": "8049"}.

    lightloop tasks load examples/sums.jsonl --dataset sums
    lightloop run examples/calculator_tool.py:agent --dataset sums

The tool parses the expression with `ast` and evaluates numbers and + - * / // % ** only (never
`eval`). Whatever goes wrong in a tool call (arguments that are not JSON, an unknown tool, a bad
expression) goes back to the model as the tool's result: a confused model costs turns, not the
rollout.
"""

import ast
import json
import operator
import re

from lightloop.llm import LLM

MAX_TURNS = 3
SYSTEM = "You are good at arithmetic. Use the calculator tool, then reply with the number only."
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "Evaluate an arithmetic expression such as '17 * 23 + 4'.",
            "parameters": {
                "type": "object",
                "properties": {"expression": {"type": "string"}},
                "required": ["expression"],
            },
        },
    }
]
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


def call_tool(name: str, arguments: str) -> str:
    if name != "calculator":
        return f"error: unknown tool {name!r}"
    try:
        args = json.loads(arguments)
    except json.JSONDecodeError:
        return "error: the arguments are not valid JSON"
    if not isinstance(args, dict) or "expression" not in args:
        return 'error: expected {"expression": "..."}'
    return calculate(args["expression"])


def score(reply: str | None, answer: str) -> float:
    numbers = re.findall(r"-?\d+(?:\.\d+)?", (reply or "").replace(",", ""))
    return 1.0 if numbers and float(numbers[-1]) == float(answer) else 0.0


def agent(task: dict, llm: LLM) -> float:
    messages: list[dict] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": task["question"]},
    ]
    with llm.openai() as client:
        for _ in range(MAX_TURNS):
            completion = client.chat.completions.create(
                model=llm.model, messages=messages, tools=TOOLS, max_tokens=64
            )
            message = completion.choices[0].message
            if not message.tool_calls:
                return score(message.content, task["answer"])
            messages.append(
                {
                    "role": "assistant",
                    "content": message.content,
                    "tool_calls": [call.model_dump() for call in message.tool_calls],
                }
            )
            for call in message.tool_calls:
                if call.type == "function":
                    result = call_tool(call.function.name, call.function.arguments)
                else:
                    result = "error: only function tools are available"
                messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    return 0.0  # no answer within MAX_TURNS
