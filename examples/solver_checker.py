"""Two agents of one task, each with an adapter of its own: a solver answers, a checker judges the
solver's answer, and the reward depends on both.

The solver's calls ask for `policy/solver` and the checker's for `policy/checker`, so with

    policy:
      - name: policy
        base_model: smollm2
        agents: {solver: {}, checker: {}}

in lightloop.yaml the proxy serves each agent by its own adapter (`policy-solver-vN`,
`policy-checker-vN`; the policy's own until the agent has a version) and records each call's
agent and adapter; `lightloop trainer` trains both adapters from the same rollouts, each on its
own calls with the other's as context, and publishes them together (README, Trainer, "Agent
adapters"). Without `agents:` both share the policy's adapter, and the example runs the same.

Reward: half for a right answer, half for a right verdict (the checker says "yes" exactly when the
answer is right), so each agent's share of the reward is its own doing.

Tasks (sums.jsonl): {"question": "What is 3 + 4?", "answer": "7"}.

    lightloop tasks load examples/sums.jsonl --dataset sums
    lightloop run examples/solver_checker.py:agent --dataset sums
"""

from lightloop.llm import LLM


def agent(task: dict, llm: LLM) -> float:
    with llm.openai() as client:
        solved = client.chat.completions.create(
            model=f"{llm.model}/solver",
            messages=[
                {"role": "system", "content": "Solve the sum. Reply with the number only."},
                {"role": "user", "content": task["question"]},
            ],
            max_tokens=16,
        )
        answer = (solved.choices[0].message.content or "").strip()
        checked = client.chat.completions.create(
            model=f"{llm.model}/checker",
            messages=[
                {"role": "system", "content": "Check the answer to the sum. Reply yes or no."},
                {"role": "user", "content": f"{task['question']} Answer: {answer}"},
            ],
            max_tokens=4,
        )
    verdict = (checked.choices[0].message.content or "").strip().lower().startswith("yes")
    right = answer == task["answer"]
    verdict_right = verdict == right
    return 0.5 * right + 0.5 * verdict_right
