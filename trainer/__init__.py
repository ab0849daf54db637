"""lightloop.trainer: trajectories from Postgres, VERL's algorithms, LoRA updates, publishing."""

from lightloop.trainer.algorithms import ALGORITHMS, Scored, drop_flat_groups, policy_loss, rollout_advantages
from lightloop.trainer.errors import PublishError, TrainerError
from lightloop.trainer.local import LocalBackend, LocalConfig
from lightloop.trainer.loop import StepOutcome, Trainer
from lightloop.trainer.publish import Engine, HttpEngine, Published, Publisher
from lightloop.trainer.rebuild import RebuildStats, Sample, Turn, rebuild, selected_by, turns_from_calls
from lightloop.trainer.select import AdapterStep, plan_adapter, select_samples
from lightloop.trainer.verl_backend import VerlBackend, to_dataproto, verl_config, verl_overrides

__all__ = [
    "ALGORITHMS",
    "AdapterStep",
    "Engine",
    "HttpEngine",
    "LocalBackend",
    "LocalConfig",
    "PublishError",
    "Published",
    "Publisher",
    "RebuildStats",
    "Sample",
    "Scored",
    "StepOutcome",
    "Trainer",
    "TrainerError",
    "Turn",
    "VerlBackend",
    "drop_flat_groups",
    "plan_adapter",
    "policy_loss",
    "rebuild",
    "rollout_advantages",
    "select_samples",
    "selected_by",
    "to_dataproto",
    "turns_from_calls",
    "verl_config",
    "verl_overrides",
]
