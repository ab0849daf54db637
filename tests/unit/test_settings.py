from __future__ import annotations

from pathlib import Path

import pytest

from lightloop import ConfigError, load_settings
from lightloop.settings import describe_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("LIGHTLOOP_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def test_defaults() -> None:
    s = load_settings()
    assert s.home == Path(".lightloop") and s.database_url is None
    assert s.writer.batch_size == 5000 and s.spool_dir == Path(".lightloop/spool")


def test_precedence_flag_over_env_over_yaml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "lightloop.yaml"
    config.write_text(
        "home: /from/yaml\nlog_level: warning\nwriter:\n  batch_size: 7\nmodel_list: [{model_name: x}]\n"
    )
    s = load_settings(config)
    assert (s.home, s.log_level, s.writer.batch_size) == (Path("/from/yaml"), "warning", 7)
    monkeypatch.setenv("LIGHTLOOP_HOME", "/from/env")
    monkeypatch.setenv("LIGHTLOOP_WRITER__BATCH_SIZE", "9")
    s = load_settings(config)
    assert (s.home, s.writer.batch_size, s.writer.queue_size) == (Path("/from/env"), 9, 100_000)
    assert load_settings(config, home=Path("/from/flag")).home == Path("/from/flag")


def test_lightloop_yaml_in_the_working_folder_is_read(tmp_path: Path) -> None:
    (tmp_path / "lightloop.yaml").write_text("database_url: postgresql://u@h:1/d\n")
    assert load_settings().database_url == "postgresql://u@h:1/d"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("writer: [1, 2\n", "not valid YAML"),
        ("- a list\n", "mapping at the top level"),
        ("writer:\n  batch_size: 0\n", "LIGHTLOOP_WRITER__BATCH_SIZE"),
    ],
)
def test_bad_yaml_is_a_config_error(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_settings(config)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")


def test_describe_settings_names_every_leaf_setting() -> None:
    names = [env for env, _, _ in describe_settings()]
    assert "LIGHTLOOP_DATABASE_URL" in names and "LIGHTLOOP_WRITER__FLUSH_INTERVAL_MS" in names
    assert "LIGHTLOOP_WRITER" not in names
    assert all(description for _, _, description in describe_settings() if _ != "LIGHTLOOP_WRITER")


def test_turn_credit_is_read_from_the_environment_and_needs_grpo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTLOOP_TRAINER__CREDIT", "turn")
    monkeypatch.setenv("LIGHTLOOP_TRAINER__GAMMA", "0.9")
    s = load_settings()
    assert (s.trainer.credit, s.trainer.gamma, load_settings().trainer.algorithm) == ("turn", 0.9, "grpo")
    monkeypatch.setenv("LIGHTLOOP_TRAINER__ALGORITHM", "rloo")
    with pytest.raises(ConfigError, match="credit=turn works with algorithm grpo"):
        load_settings()
    monkeypatch.setenv("LIGHTLOOP_TRAINER__ALGORITHM", "grpo")
    for bad in ("LIGHTLOOP_TRAINER__CREDIT=step", "LIGHTLOOP_TRAINER__GAMMA=1.5"):
        name, value = bad.split("=")
        monkeypatch.setenv(name, value)
        with pytest.raises(ConfigError, match=name):
            load_settings()
        monkeypatch.setenv("LIGHTLOOP_TRAINER__CREDIT", "turn")
        monkeypatch.setenv("LIGHTLOOP_TRAINER__GAMMA", "0.9")


def test_agent_adapters_from_lightloop_policy_json_and_names_that_clash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "LIGHTLOOP_POLICY",
        '[{"name": "policy", "base_model": "tiny", "agents": {"planner": {}, "coder": {}}}]',
    )
    s = load_settings()
    assert [a.name for a in s.adapters()] == ["policy", "policy-planner", "policy-coder"]
    (policy,) = s.policy
    assert (policy.adapter_of("planner"), policy.adapter_of("tester"), policy.adapter_of(None)) == (
        "policy-planner",
        "policy",
        "policy",
    )
    assert {a.base_model for a in s.adapters()} == {"tiny"}
    bad = {
        '[{"name": "p", "agents": {"a b": {}}}]': "agent name 'a b'",
        '[{"name": "p", "agents": {"x": {"lr": 1}}}]': "AGENTS__X__LR: Extra inputs",
        '[{"name": "p", "agents": {"x": {}}}, {"name": "p-x"}]': "adapter names clash: p-x",
        '[{"name": "p", "agents": ["a", "a"]}]': "agents listed twice",
        '[{"name": "p", "agents": [{"a": {}}]}]': "their names only",
        '[{"name": "p", "agents": "a, v2"}]': "agent name 'v2'",
    }
    for value, message in bad.items():
        monkeypatch.setenv("LIGHTLOOP_POLICY", value)
        with pytest.raises(ConfigError, match=message):
            load_settings()
    # A list, or compose's comma-separated POLICY_AGENTS (empty: none), mean the same.
    for agents in ('["planner", "coder"]', '" planner,coder "'):
        monkeypatch.setenv("LIGHTLOOP_POLICY", f'[{{"name": "policy", "agents": {agents}}}]')
        assert [a.name for a in load_settings().adapters()] == ["policy", "policy-planner", "policy-coder"]
    monkeypatch.setenv("LIGHTLOOP_POLICY", '[{"name": "policy", "agents": ""}]')
    assert load_settings().policy[0].agents == {}


def test_vllm_flags_give_a_lora_slot_per_kept_version_of_every_adapter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lightloop.vllm_flags import vllm_args

    monkeypatch.setenv("LIGHTLOOP_POLICY", '[{"name": "policy", "agents": "planner,coder"}]')
    monkeypatch.setenv("LIGHTLOOP_TRAINER__KEEP_VERSIONS", "3")
    monkeypatch.setenv("LIGHTLOOP_TRAINER__LORA_RANK", "9")
    args = vllm_args(load_settings())
    assert args[args.index("--max-loras") + 1] == "9"  # 3 adapters x 3 versions
    assert args[args.index("--max-lora-rank") + 1] == "16"  # the smallest vLLM rank holding 9
    with pytest.raises(ConfigError, match="not a policy model"):
        vllm_args(load_settings(), "other")
    # Another policy on the same engine shares its slots; one on another engine does not.
    monkeypatch.setenv(
        "LIGHTLOOP_POLICY",
        '[{"name": "policy", "agents": "planner", "upstreams": ["http://e:8000"]},'
        ' {"name": "judge", "upstreams": ["http://e:8000/v1/"]}, {"name": "far", "upstreams": ["http://f:8000"]}]',
    )
    args = vllm_args(load_settings())
    assert args[args.index("--max-loras") + 1] == "9"  # (2 + 1) adapters x 3 versions
    monkeypatch.setenv("LIGHTLOOP_TRAINER__LORA_RANK", "513")
    with pytest.raises(ConfigError, match="above vLLM's largest"):
        vllm_args(load_settings())
