"""The `lightloop` command as users run it: real processes, real Postgres."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import asyncpg
import pytest

from lightloop.settings import describe_settings
from lightloop.store import head_revision
from lightloop.store.database import dsn
from tests.conftest import LIGHTLOOP


def run(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LIGHTLOOP_")}
    full_env.update(env or {})
    return subprocess.run(
        [LIGHTLOOP, *args],
        capture_output=True,
        text=True,
        env=full_env,
        input=stdin,
        timeout=120,
        check=False,
    )


def test_sql_prints_a_table_and_json(db_url: str) -> None:
    env = {"LIGHTLOOP_DATABASE_URL": db_url}
    assert (
        run("sql", "INSERT INTO rollouts (id, metadata) VALUES ('r1', '{\"k\": 1}')", env=env).returncode == 0
    )
    table = run("sql", "SELECT id, mode, metadata FROM rollouts", env=env)
    assert table.returncode == 0, table.stderr
    assert "| id   | mode   | metadata   |" in table.stdout
    assert '| r1   | train  | {"k": 1}   |' in table.stdout
    assert table.stdout.rstrip().endswith("(1 row)")
    as_json = run("sql", "--json", "SELECT id, metadata, created_at FROM rollouts", env=env)
    rows = json.loads(as_json.stdout)
    assert rows[0]["id"] == "r1" and rows[0]["metadata"] == {"k": 1}
    assert rows[0]["created_at"].startswith("20")
    from_stdin = run("sql", "-", env=env, stdin="SELECT count(*) AS n FROM rollouts")
    assert "| 1   |" in from_stdin.stdout


def test_broken_sql_prints_postgres_message_without_traceback(db_url: str) -> None:
    result = run("sql", "SELEC * FROM rollouts", env={"LIGHTLOOP_DATABASE_URL": db_url})
    assert result.returncode == 1
    assert 'syntax error at or near "SELEC"' in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("url", "host", "port", "cause"),
    [
        ("postgresql://postgres@127.0.0.1:1/x", "127.0.0.1", "1", "connection refused"),
        ("postgresql://postgres@no-such-host.invalid:5433/x", "no-such-host.invalid", "5433", "unknown host"),
    ],
)
def test_a_wrong_database_url_gives_one_clear_line(url: str, host: str, port: str, cause: str) -> None:
    for args in (("sql", "SELECT 1"), ("db", "upgrade")):
        result = run(*args, env={"LIGHTLOOP_DATABASE_URL": url})
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert f"{host}:{port}" in lines[0] and cause in lines[0]


def test_not_a_postgres_url_is_refused_clearly() -> None:
    result = run("sql", "SELECT 1", env={"LIGHTLOOP_DATABASE_URL": "mysql://root@localhost/db"})
    assert result.returncode == 1
    assert "not a Postgres URL" in result.stderr and "Traceback" not in result.stderr


async def test_db_upgrade_migrates_and_refuses_a_newer_schema(empty_db_url: str) -> None:
    env = {"LIGHTLOOP_DATABASE_URL": empty_db_url}
    first = run("db", "upgrade", env=env)
    assert first.returncode == 0, first.stderr
    assert f"revision {head_revision()}" in first.stdout
    conn = await asyncpg.connect(dsn(empty_db_url))
    await conn.execute("UPDATE alembic_version SET version_num = 'abcdef999'")
    await conn.close()
    refused = run("db", "upgrade", env=env)
    assert refused.returncode == 1
    assert "abcdef999" in refused.stderr and "newer lightloop" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_invalid_settings_and_config_files_are_reported(tmp_path: Path) -> None:
    bad = run("sql", "SELECT 1", env={"LIGHTLOOP_WRITER__BATCH_SIZE": "lots"})
    assert bad.returncode == 1 and "LIGHTLOOP_WRITER__BATCH_SIZE" in bad.stderr
    missing = run("--config", str(tmp_path / "nope.yaml"), "sql", "SELECT 1")
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("writer: [unclosed\n")
    result = run("sql", "SELECT 1", env={"LIGHTLOOP_CONFIG": str(broken)})
    assert result.returncode == 1 and "not valid YAML" in result.stderr
    assert "Traceback" not in bad.stderr + missing.stderr + result.stderr


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (("proxy", "--port", "70000"), "--port"),
        (("engine", "--max-batch-size", "0"), "--max-batch-size"),
        (("proxy", "--ssl-certfile", "/etc/hostname"), "ssl_keyfile go together"),
        (
            ("proxy", "--ssl-certfile", "/nowhere.pem", "--ssl-keyfile", "/nowhere.key"),
            "/nowhere.pem is not a file",
        ),
    ],
)
def test_flags_are_validated_like_the_settings_they_override(
    tmp_path: Path, args: tuple[str, ...], flag: str
) -> None:
    result = run(*args, env={"LIGHTLOOP_HOME": str(tmp_path / "home")})
    assert result.returncode == 2, result.stdout + result.stderr
    assert flag in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_the_yaml_file_configures_the_database(db_url: str, tmp_path: Path) -> None:
    config = tmp_path / "lightloop.yaml"
    config.write_text(f"database_url: {db_url}\nmodel_list: []\n")
    result = run("--config", str(config), "sql", "SELECT current_database() AS db")
    assert result.returncode == 0, result.stderr
    assert db_url.rsplit("/", 1)[1] in result.stdout


def test_help_shows_every_setting_with_its_environment_variable() -> None:
    result = run("--help")
    assert result.returncode == 0
    for env, _default, _description in describe_settings():
        assert env in result.stdout, env
    for command in ("up", "db", "sql"):
        assert command in result.stdout


def test_a_bad_policy_section_stops_the_proxy_with_one_line(tmp_path: Path) -> None:
    for text, expected in (
        ("policy: [{name: p, base_model: m, upstreams: []}]\n", "LIGHTLOOP_POLICY"),
        ("policy: [{name: p, base_model: m}, {name: p, base_model: n}]\n", "unique"),
        ("proxy: {port: 99999}\n", "LIGHTLOOP_PROXY__PORT"),
    ):
        config = tmp_path / "lightloop.yaml"
        config.write_text(text)
        result = run("--config", str(config), "proxy", env={"LIGHTLOOP_HOME": str(tmp_path / "home")})
        assert result.returncode == 1, result.stderr
        assert expected in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_trainer_check_fails_without_a_heartbeat_and_passes_with_a_fresh_one(tmp_path: Path) -> None:
    env = {"LIGHTLOOP_HOME": str(tmp_path)}
    missing = run("trainer", "--check", env=env)
    assert missing.returncode == 1
    assert missing.stderr.strip() == (
        f"lightloop: error: no trainer heartbeat at {tmp_path / 'run' / 'trainer.heartbeat'}"
    )
    beat = tmp_path / "run" / "trainer.heartbeat"
    beat.parent.mkdir()
    beat.touch()
    assert run("trainer", "--check", env=env).returncode == 0
    os.utime(beat, (0, 0))
    stale = run("trainer", "--check", "--max-age", "30", env=env)
    assert stale.returncode == 1 and "limit 30 s" in stale.stderr


@pytest.mark.parametrize("command", [["trainer"], ["up"], ["demo", "--model", "tiny"]])
def test_training_without_the_train_extra_is_one_clear_line(command: list[str], tmp_path: Path) -> None:
    # What a plain `pip install lightloop`, or the lean lightloop:serve image, gives: VERL and
    # matplotlib absent (a None in sys.modules is how Python marks a module as not importable).
    hide = "import sys\nsys.modules['verl'] = sys.modules['matplotlib'] = None\n"
    (tmp_path / "sitecustomize.py").write_text(hide)
    env = {"PYTHONPATH": str(tmp_path), "LIGHTLOOP_HOME": str(tmp_path / "home")}
    result = run(*command, env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.strip() == (
        "lightloop: error: training needs the 'train' extra (verl, matplotlib not installed): "
        "pip install 'lightloop[train]', or use the lightloop:cpu image"
    )
    assert not (tmp_path / "home").exists()  # nothing was started before the check
