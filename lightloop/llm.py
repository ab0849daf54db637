"""What an agent function gets besides its task: where to send its LLM calls so that they are
recorded as this rollout's, and ready-made OpenAI clients for that.

    def agent(task: dict, llm: lightloop.LLM) -> float:
        answer = llm.openai().chat.completions.create(model=llm.model, messages=[...])
        return 1.0 if answer.choices[0].message.content == task["answer"] else 0.0

`base_url` is the rollout's path form (`.../rollout/{id}/attempt/{n}/v1`), so any framework that
takes an OpenAI base URL (LangChain, AutoGen, OpenAI Agents, CrewAI, plain HTTP) attributes its
calls without knowing about lightloop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # Aliased: the method `openai` below would shadow the module in annotations.
    import openai as openai_sdk

__all__ = ["LLM"]


@dataclass(frozen=True)
class LLM:
    base_url: str  # OPENAI_BASE_URL for this rollout, ending in /v1
    api_key: str
    model: str  # the model to ask for: the policy model by default
    rollout_id: str
    mode: str = "train"  # "val": a held-out evaluation rollout (never trained on)
    attempt: int = 1
    group_id: str | None = None
    task_id: str | None = None
    # Headers that say the same as the path, for clients that cannot change their base URL.
    headers: dict[str, str] = field(default_factory=dict)

    def openai(self, **kwargs: object) -> openai_sdk.OpenAI:
        """An `openai.OpenAI` client for this rollout (keyword arguments go to the client)."""
        import openai

        return openai.OpenAI(
            base_url=self.base_url,
            api_key=self.api_key,
            default_headers=self.headers,
            **kwargs,  # type: ignore[arg-type]
        )

    def async_openai(self, **kwargs: object) -> openai_sdk.AsyncOpenAI:
        """An `openai.AsyncOpenAI` client for this rollout."""
        import openai

        return openai.AsyncOpenAI(
            base_url=self.base_url,
            api_key=self.api_key,
            default_headers=self.headers,
            **kwargs,  # type: ignore[arg-type]
        )
