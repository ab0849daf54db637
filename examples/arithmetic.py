"""The smallest agent: one chat call with the plain `openai` SDK, reward 1.0 for the exact sum.

Tasks (arithmetic.jsonl): {"question": "What is 3 + 4?", "answer": "7"}.

    lightloop tasks load examples/arithmetic.jsonl --dataset arithmetic
    lightloop run examples/arithmetic.py:agent --dataset arithmetic
"""

from lightloop.llm import LLM


def agent(task: dict, llm: LLM) -> float:
    with llm.openai() as client:
        completion = client.chat.completions.create(
            model=llm.model,
            messages=[
                {"role": "system", "content": "You are a calculator. Reply with the number only."},
                {"role": "user", "content": task["question"]},
            ],
            max_tokens=16,
        )
    reply = completion.choices[0].message.content or ""
    return 1.0 if reply.strip() == task["answer"] else 0.0
