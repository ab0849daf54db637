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

# The same safe calculator and scoring as the plain-SDK example beside this file.
from calculator_tool import calculate, score

from lightloop.llm import LLM

MAX_TURNS = 3
SYSTEM = "You are good at arithmetic. Use the calculator tool, then reply with the number only."
set_tracing_disabled(True)


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
