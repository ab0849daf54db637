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

# The same safe calculator and scoring as the plain-SDK example beside this file.
from calculator_tool import calculate, score
from langchain.agents import create_agent
from langchain.agents.middleware import ModelCallLimitMiddleware
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from lightloop.llm import LLM

MAX_MODEL_CALLS = 3
SYSTEM = "You are good at arithmetic. Use the calculator tool, then reply with the number only."


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
