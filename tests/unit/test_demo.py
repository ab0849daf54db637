"""The demo's task and reward: pure functions."""

from __future__ import annotations

from lightloop.demo import Task, reward, tasks


def test_the_exact_answer_gets_1_and_partial_credit_points_the_way() -> None:
    task = Task(7, 5)
    assert reward(task, "12") == 1.0
    assert reward(task, " 12.\n") == 1.0
    assert reward(task, "The answer is 12") == 0.5
    assert reward(task, "13") == 0.1
    assert reward(task, "twelve") == 0.0


def test_held_out_tasks_are_never_training_tasks() -> None:
    train, held = tasks()
    assert len(held) == 32 and not set(train) & set(held)
    assert tasks() == (train, held)  # the split is fixed
