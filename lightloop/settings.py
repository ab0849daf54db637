"""Settings: `lightloop.yaml` plus `LIGHTLOOP_*` environment variables, read once by the CLI.

Precedence, highest first: command-line flags, environment variables, the YAML file, defaults.
Nested settings use `__` in their environment names (`LIGHTLOOP_WRITER__BATCH_SIZE`). The YAML
file may hold other sections (LiteLLM's `model_list`, `policy`, ...); keys this model does not
know are ignored here and read by the part that owns them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from lightloop.errors import ConfigError

ENV_PREFIX = "LIGHTLOOP_"
NESTED_DELIMITER = "__"

# The YAML file is chosen at run time (flag or LIGHTLOOP_CONFIG), but pydantic-settings builds its
# sources in a classmethod; a context variable carries the path there without global state.
_yaml_path: ContextVar[Path | None] = ContextVar("_yaml_path", default=None)


class WriterSettings(BaseModel):
    """The store's batch writer (proxy and OTLP ingest)."""

    queue_size: int = Field(
        100_000, ge=1, description="Rows held in memory before new ones are dropped (and counted)."
    )
    queue_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024 * 1024,
        description=(
            "Bytes (roughly) the queued rows may hold before new ones are dropped (and counted); a "
            "batch holds at most a quarter of it."
        ),
    )
    batch_size: int = Field(5_000, ge=1, description="Rows per COPY batch.")
    flush_interval_ms: int = Field(
        200, ge=1, description="Longest a row waits in memory before its batch is written."
    )
    retry_interval_s: float = Field(
        1.0, gt=0, description="Pause between reconnect attempts while Postgres is down."
    )
    flush_timeout_s: float = Field(
        # Above the writer's statement (30 s) and connect (10 s) timeouts: a server that vanished
        # without a reset is waited out and the batch spooled before a route gives up.
        60.0,
        gt=0,
        description=(
            "Longest a route (finish, rewards, OTLP) waits for the writer, or for other proxy "
            "processes' writers to write a rollout it names, before a 503."
        ),
    )
    mark_interval_s: float = Field(
        0.25,
        ge=0,
        description=(
            "How often the writer records in Postgres that everything it accepted is written "
            "(writer_marks); claims wait for every proxy process's mark. 0 turns marks off "
            "(one proxy process only)."
        ),
    )
    stale_after_s: float = Field(
        # Above flush_timeout_s: a writer waiting out a stuck flush is alive, not gone.
        90.0,
        gt=0,
        description=(
            "A writer not heard from for this long is gone (killed) and no longer holds claims back; "
            "more than flush_timeout_s + mark_interval_s."
        ),
    )

    @model_validator(mode="after")
    def _stale_after_a_stuck_flush(self) -> WriterSettings:
        if self.mark_interval_s > 0 and self.stale_after_s <= self.flush_timeout_s + self.mark_interval_s:
            raise ValueError(
                "stale_after_s must be more than flush_timeout_s + mark_interval_s: a writer waiting "
                "out a stuck flush would be taken for gone and its rows trained without"
            )
        return self


class EngineSettings(BaseModel):
    """`lightloop engine`: the CPU engine that speaks the vLLM API subset lightloop uses."""

    model: str = Field(
        "smollm2", description="smollm2, tiny (a small random Llama for tests) or a model folder."
    )
    host: str = Field("127.0.0.1", description="Address the engine listens on.")
    port: int = Field(8000, ge=0, le=65535, description="Engine port (vLLM's default).")
    served_model_name: str | None = Field(
        None, description="Model id clients use (default: the --model value)."
    )
    max_model_len: int = Field(2048, ge=16, description="Longest prompt plus completion, in tokens.")
    max_batch_size: int = Field(16, ge=1, description="Sequences decoded together in one step.")
    threads: int | None = Field(None, ge=1, description="CPU threads for PyTorch (default: all cores).")
    api_key: SecretStr | None = Field(
        None,
        description=(
            "Key every /v1 route requires (vLLM's --api-key); give the policies' api_key the same. "
            "/health and /metrics stay open."
        ),
    )
    lora_root: Path | None = Field(
        None, description="Only adapters under this folder are loaded (default: LIGHTLOOP_HOME/checkpoints)."
    )
    allow_runtime_lora_updating: bool = Field(
        False,
        description=(
            "Serve load_lora_adapter/unload_lora_adapter (vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING); "
            "the trainer needs it, `lightloop up` turns it on for its engine."
        ),
    )


class PolicyModelSettings(BaseModel):
    """A trainable model: the proxy's policy lane serves it with token ids and the live version."""

    name: str = Field("policy", min_length=1, description="The model name agents ask for.")
    base_model: str = Field(
        "smollm2", min_length=1, description="The engines' served model name while no version is live."
    )
    upstreams: list[str] = Field(
        default_factory=lambda: ["http://127.0.0.1:8000"],
        min_length=1,
        description="Engine base URLs (vLLM or `lightloop engine`); each rollout sticks to one.",
    )
    api_key: SecretStr | None = Field(None, description="Key the engines require (vLLM --api-key), if any.")
    agents: dict[str, AgentAdapterSettings] = Field(
        default_factory=dict,
        description=(
            "Agents with an adapter of their own ({planner: {}, coder: {}}, or a list, or "
            "`planner,coder`): served as `<name>-<agent>-vN` and trained beside the policy's "
            "adapter; agents not listed share the policy's adapter."
        ),
    )

    @field_validator("agents", mode="before")
    @classmethod
    def _agents_as_names(cls, agents: Any) -> Any:
        # Compose builds LIGHTLOOP_POLICY from .env: `POLICY_AGENTS=planner,coder` is simplest.
        if isinstance(agents, str):
            agents = [a.strip() for a in agents.split(",") if a.strip()]
        if isinstance(agents, list):
            if not all(isinstance(a, str) for a in agents):
                raise ValueError("a list of agents holds their names only: [planner, coder]")
            if len(set(agents)) != len(agents):
                raise ValueError(f"agents listed twice: {agents}")
            return {agent: {} for agent in agents}
        return agents

    @field_validator("agents")
    @classmethod
    def _agent_names(cls, agents: dict[str, AgentAdapterSettings]) -> dict[str, AgentAdapterSettings]:
        for agent in agents:
            if not AGENT_NAME.fullmatch(agent):
                raise ValueError(
                    f"agent name {agent!r}: use letters, digits, '_', '.' or '-' (at most 64), not v<digits>"
                )
        return agents

    def adapter_of(self, agent: str | None) -> str:
        """The adapter's policy key that serves `agent`'s calls: its own, or the policy's."""
        return f"{self.name}-{agent}" if agent is not None and agent in self.agents else self.name

    def adapters(self) -> list[PolicyModelSettings]:
        """The policy and one entry per agent adapter (same base model and engines): each has
        its own versions, published and made live like a policy's."""
        own = [self.model_copy(update={"name": self.adapter_of(a), "agents": {}}) for a in self.agents]
        return [self, *own]


class AgentAdapterSettings(BaseModel):
    """One agent's own adapter of a policy (nothing to set yet: the trainer's settings apply)."""

    model_config = ConfigDict(extra="forbid")


# An agent with an adapter of its own: its name goes into adapter names (`policy-planner-v3`), so
# plain characters only, and never `v<digits>`, which would read as a version of the policy.
AGENT_NAME = re.compile(r"(?!v\d+$)[A-Za-z0-9_.-]{1,64}")


class ProxySettings(BaseModel):
    """`lightloop proxy`: the LiteLLM proxy app with lightloop's policy lane and routes."""

    host: str = Field("127.0.0.1", description="Address the proxy listens on.")
    port: int = Field(4000, ge=0, le=65535, description="Proxy port (LiteLLM's default).")
    workers: int = Field(1, ge=1, description="Proxy processes sharing the port.")
    max_body_bytes: int = Field(
        10 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 above it)."
    )
    upstream_timeout_s: float = Field(
        600.0, gt=0, description="Longest wait for an engine's answer (and between streamed chunks)."
    )
    upstream_retries: int = Field(
        2, ge=0, description="Retries on connect errors and 5xx before the first byte reached the agent."
    )
    otlp_endpoint: str | None = Field(
        None, description="OTLP/HTTP traces URL to export the proxy's spans to as well (optional)."
    )
    record: bool = Field(
        True, description="false serves without recording anything (only to measure recording's cost)."
    )
    max_rollouts_in_flight: int = Field(
        0,
        ge=0,
        description="Train rollouts open at once per proxy process; a new one above it gets 429 (0: no cap).",
    )
    rollout_idle_s: float = Field(
        600.0, gt=0, description="A rollout with no call for this long no longer counts as in flight."
    )
    session_memory: int = Field(
        100_000, ge=1, description="Conversations remembered per proxy process for inferred sessions."
    )
    versions_reread_s: float = Field(
        30.0,
        gt=0,
        description=(
            "How often the proxy re-reads the live policy versions besides LISTEN, which a "
            "half-open connection silences without an error."
        ),
    )
    key_cache_s: float = Field(
        5.0,
        ge=0,
        description=(
            "How long a proxy process trusts its lookup of a scoped key: a revoked key stops "
            "working in every process within this time."
        ),
    )
    litellm_admin: bool = Field(
        False,
        description=(
            "Serve LiteLLM's admin UI and management routes (keys, users, teams, models, spend) on "
            "the proxy's port, to admin keys; off, they answer 404."
        ),
    )
    ssl_certfile: Path | None = Field(
        None, description="PEM certificate (chain) to serve HTTPS with; needs ssl_keyfile too."
    )
    ssl_keyfile: Path | None = Field(None, description="PEM private key of ssl_certfile.")

    @model_validator(mode="after")
    def _tls_files(self) -> ProxySettings:
        # Whether the files exist is checked by `lightloop proxy` only: other processes reading
        # the same lightloop.yaml (a trainer pod) need not have them mounted.
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile go together: give both, or neither")
        return self

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_certfile is not None else "http"


class QueueSettings(BaseModel):
    """The task queue on the proxy (`POST /v1/tasks/next`) that runners take rollouts from."""

    lease_s: float = Field(
        60.0, gt=0, description="A handed-out rollout's lease; runners renew it by heartbeat."
    )
    max_attempts: int = Field(
        3, ge=1, description="Attempts per rollout; after the last lapses it is finished as failed."
    )
    failed_reward: float = Field(
        0.0, description="Reward of a queue rollout that failed or finished without a reward."
    )
    max_groups_in_flight: int | None = Field(
        None,
        ge=0,
        description=(
            "Train groups handed out and not yet trained, per policy (default: (MAX_STALENESS + 1) x "
            "GROUPS_PER_STEP of the trainer settings; 0: no limit)."
        ),
    )
    reap_interval_s: float = Field(
        1.0, gt=0, description="How often the proxy re-queues rollouts whose lease lapsed."
    )


class VerlSettings(BaseModel):
    """The `verl` backend: VERL's FSDP actor, in this process or as a Ray worker group."""

    nodes: int = Field(1, ge=1, description="Nodes of the Ray worker group (verl backend).")
    gpus_per_node: int = Field(
        1, ge=1, description="Workers (GPUs) per node; 1 node x 1 runs in the trainer's own process."
    )
    ray_address: str | None = Field(
        None, description="Ray cluster to join (`auto` inside a RayJob); default: start a local one."
    )
    max_tokens_per_gpu: int = Field(
        16384, ge=256, description="Tokens per forward pass on one worker (VERL's dynamic batch size)."
    )
    strategy: str = Field(
        "fsdp2", pattern="^(fsdp|fsdp2)$", description="VERL actor strategy: fsdp2 or fsdp."
    )
    device: str = Field(
        "auto",
        pattern="^(auto|cpu|cuda)$",
        description="auto: CUDA when the workers have GPUs (the Ray cluster's, not the driver's), else CPU.",
    )


class TrainerSettings(BaseModel):
    """`lightloop trainer`: the daemon that turns finished, rewarded rollouts into new versions."""

    policy: str | None = Field(
        None, description="The policy model to train (default: the first under policy)."
    )
    model: str | None = Field(
        None,
        description="Base weights to train: smollm2, tiny or a model folder (default: the engine's --model).",
    )
    backend: str = Field(
        "local",
        pattern="^(local|verl)$",
        description="local (transformers + peft) or verl (VERL's FSDP actor; Ray for many GPUs).",
    )
    verl: VerlSettings = Field(default_factory=VerlSettings)
    algorithm: str = Field(
        "grpo", pattern="^(grpo|rloo|reinforce_plus_plus)$", description="grpo, rloo or reinforce_plus_plus."
    )
    credit: str = Field(
        "rollout",
        pattern="^(rollout|turn)$",
        description=(
            "rollout: one reward per rollout, shared by its turns; turn: rewards posted for a call "
            "(response_id or span_id) credit that call and the ones before it (grpo only)."
        ),
    )
    gamma: float = Field(
        1.0, ge=0, le=1, description="Discount of later turns' rewards in a turn's return (credit=turn)."
    )
    groups_per_step: int = Field(8, ge=1, description="Rollout groups claimed per training step.")
    min_groups: int = Field(1, ge=1, description="Wait until at least this many groups are ready.")
    learning_rate: float = Field(1e-4, gt=0, description="AdamW learning rate of the LoRA weights.")
    lora_rank: int = Field(8, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(16, ge=1, description="LoRA alpha (the update is scaled by alpha / rank).")
    clip_ratio: float = Field(0.2, gt=0, description="PPO clip range.")
    tis_cap: float = Field(2.0, ge=1, description="Truncated importance sampling cap (serving vs training).")
    kl_coef: float = Field(0.0, ge=0, description="Weight of a KL penalty to the base model (0: none).")
    micro_batch_size: int = Field(4, ge=1, description="Samples per forward/backward pass.")
    max_staleness: int = Field(
        2, ge=0, description="Drop rollouts served by a version older than live minus this."
    )
    keep_versions: int = Field(
        2, ge=1, description="Adapters kept loaded on the engines (older ones unloaded)."
    )
    agents: list[str] = Field(
        default_factory=list,
        description="Agents to train (X-Lightloop-Agent or model alias); others are context. Empty: all.",
    )
    lease_s: float = Field(
        600.0, gt=0, description="How long a claim holds before another trainer may take it."
    )
    group_settle_s: float = Field(
        30.0,
        ge=0,
        description="A group with no declared size is claimed this long after its newest member finished.",
    )
    poll_interval_s: float = Field(2.0, gt=0, description="Pause between claims when nothing is ready.")
    engines: list[str] = Field(
        default_factory=list, description="Engines to publish to (default: the policy's upstreams)."
    )
    seed: int = Field(0, description="Seed for the LoRA initialisation.")
    max_step_s: float = Field(
        3600.0,
        gt=0,
        description="A longer step stops the heartbeat, so `trainer --check` fails and restarts it.",
    )

    @model_validator(mode="after")
    def _turn_credit_needs_grpo(self) -> TrainerSettings:
        # RLOO's leave-one-out and REINFORCE++'s batch whitening are defined over rollouts; what
        # they would mean over turns of unequal count per rollout is not settled, so refuse.
        if self.credit == "turn" and self.algorithm != "grpo":
            raise ValueError(f"credit=turn works with algorithm grpo, not {self.algorithm}")
        return self


class Settings(BaseSettings):
    """Everything lightloop reads from its environment; the CLI builds one and passes it down."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=NESTED_DELIMITER,
        extra="ignore",
        validate_default=True,
    )

    config: Path | None = Field(
        None, description="Path of lightloop.yaml (default: ./lightloop.yaml when present)."
    )
    home: Path = Field(
        Path(".lightloop"),
        description="Folder for embedded Postgres data, spool, checkpoints and keys.",
    )
    database_url: str | None = Field(
        None,
        description="Postgres URL to use instead of the embedded Postgres (postgresql://user@host:port/db).",
    )
    log_level: str = Field("info", description="Log level: debug, info, warning or error.")
    writer: WriterSettings = Field(default_factory=WriterSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    proxy: ProxySettings = Field(default_factory=ProxySettings)
    trainer: TrainerSettings = Field(default_factory=TrainerSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    policy: list[PolicyModelSettings] = Field(
        default_factory=list,
        description=(
            "Trainable models, a list of {name, base_model, upstreams, api_key, agents} (default: one model "
            "`policy` served by `lightloop engine` as configured under engine)."
        ),
    )
    master_key: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("LITELLM_MASTER_KEY", "master_key"),
        description="LITELLM_MASTER_KEY: the proxy's key (default: generated and kept under home).",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = _yaml_path.get()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)

    @model_validator(mode="after")
    def _default_policy(self) -> Settings:
        # Out of the box the trainable model is the one `lightloop engine` serves, wherever it is.
        if not self.policy:
            engine = self.engine
            self.policy = [
                PolicyModelSettings(
                    name="policy",
                    base_model=engine.served_model_name or engine.model,
                    upstreams=[f"http://{engine.host}:{engine.port}"],
                )
            ]
        names = [p.name for p in self.policy]
        if len(set(names)) != len(names):
            raise ValueError(f"policy model names must be unique, got {names}")
        # An agent adapter's versions live under `<policy>-<agent>`, so that key may name nothing else.
        keys = [a.name for p in self.policy for a in p.adapters()]
        clashing = sorted({k for k in keys if keys.count(k) > 1})
        if clashing:
            raise ValueError(
                f"adapter names clash: {', '.join(clashing)} (a policy named like another's agent adapter)"
            )
        return self

    def adapters(self) -> list[PolicyModelSettings]:
        """Every policy and every agent adapter of one: what has versions of its own."""
        return [a for p in self.policy for a in p.adapters()]

    @property
    def spool_dir(self) -> Path:
        return self.home / "spool"

    @property
    def pgdata(self) -> Path:
        return self.home / "postgres"

    @property
    def model_cache(self) -> Path:
        return self.home / "models"

    @property
    def checkpoints(self) -> Path:
        return self.home / "checkpoints"

    @property
    def trainer_heartbeat(self) -> Path:
        return self.run_dir / "trainer.heartbeat"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Read settings once. `config` is the YAML path (flag or LIGHTLOOP_CONFIG, resolved by the CLI)."""
    if config is None and Path("lightloop.yaml").is_file():
        config = Path("lightloop.yaml")
    if config is not None:
        _check_yaml(config)
    token = _yaml_path.set(config)
    try:
        settings = Settings(config=config, **{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None
    finally:
        _yaml_path.reset(token)
    return settings


def _check_yaml(path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")


def _format_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = NESTED_DELIMITER.join(str(p) for p in err["loc"]).upper()
        parts.append(f"{ENV_PREFIX}{loc}: {err['msg']}")
    return "invalid settings: " + "; ".join(parts)


def describe_settings(
    model: type[BaseModel] = Settings, prefix: str = ENV_PREFIX
) -> Iterator[tuple[str, str, str]]:
    """(environment variable, default, description) for every setting, nested ones flattened."""
    for name, field in model.model_fields.items():
        env = f"{prefix}{name.upper()}"
        if isinstance(field.validation_alias, AliasChoices):
            # A setting read under another product's name (LITELLM_MASTER_KEY), without our prefix.
            env = str(field.validation_alias.choices[0])
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from describe_settings(annotation, env + NESTED_DELIMITER)
            continue
        default = field.get_default(call_default_factory=True)
        yield env, "" if default is None else str(default), field.description or ""
