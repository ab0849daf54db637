"""lightloop.store: the Postgres schema, connections, batch writer, claims and policy versions."""

from lightloop.store.claims import (
    Claim,
    ClaimedRollout,
    StepRecord,
    claim_groups,
    extend_claim,
    record_step,
    release_claim,
    release_expired,
)
from lightloop.store.database import connect, create_engine, create_pool, dsn, translated
from lightloop.store.embedded import EmbeddedPostgres, resolve_database_url
from lightloop.store.errors import (
    ClaimLost,
    Conflict,
    DatabaseUnavailable,
    EmbeddedPostgresError,
    NotFound,
    PolicyVersionError,
    QueryError,
    SchemaError,
    StoreError,
)
from lightloop.store.migrate import check_current, current_revision, head_revision, upgrade
from lightloop.store.policies import (
    CHANNEL,
    PolicyChange,
    PolicyListener,
    PolicyVersion,
    adapter_name,
    fail_version,
    list_versions,
    live_version,
    retire_version,
    set_live,
    stage_version,
)
from lightloop.store.query import QueryResult, run_sql
from lightloop.store.rewards import TRAINING_REWARD, RewardRecord, add_reward, finish_rollout
from lightloop.store.schema import metadata
from lightloop.store.writer import BatchWriter, WriterStats

__all__ = [
    "CHANNEL",
    "TRAINING_REWARD",
    "BatchWriter",
    "Claim",
    "ClaimLost",
    "ClaimedRollout",
    "Conflict",
    "DatabaseUnavailable",
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "NotFound",
    "PolicyChange",
    "PolicyListener",
    "PolicyVersion",
    "PolicyVersionError",
    "QueryError",
    "QueryResult",
    "RewardRecord",
    "SchemaError",
    "StepRecord",
    "StoreError",
    "WriterStats",
    "adapter_name",
    "add_reward",
    "check_current",
    "claim_groups",
    "connect",
    "create_engine",
    "create_pool",
    "current_revision",
    "dsn",
    "extend_claim",
    "fail_version",
    "finish_rollout",
    "head_revision",
    "list_versions",
    "live_version",
    "metadata",
    "record_step",
    "release_claim",
    "release_expired",
    "resolve_database_url",
    "retire_version",
    "run_sql",
    "set_live",
    "stage_version",
    "translated",
    "upgrade",
]
