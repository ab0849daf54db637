#!/usr/bin/env bash
# `make compose-smoke`: build lightloop's images with deploy/Dockerfile and run the CPU stack with
# deploy/compose.yaml as a user would, then check it from the host (deploy/smoke/check.py).
#
# On a machine without Docker it installs Debian's docker.io and docker-compose and starts
# dockerd (as root). Images no registry here serves (the Python base, postgres:18) are replaced by
# local stand-ins built from Debian's packages (deploy/smoke/), under the very tags compose and the
# Dockerfile name, so neither file is edited for the smoke. Exits non-zero at the first failure,
# with the failing service's last log lines.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PROJECT=${SMOKE_PROJECT:-lightloop-smoke}
PYTHON=${SMOKE_PYTHON:-$ROOT/.venv/bin/python}
PYTHON_IMAGE=python:3.11-slim-bookworm
POSTGRES_IMAGE=postgres:18
MIRROR=${SMOKE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
WORK=$(mktemp -d)
trap 'rm -rf --one-file-system "$WORK"' EXIT

say() { printf 'smoke: %s\n' "$*"; }
die() { printf 'smoke: FAILED: %s\n' "$*" >&2; exit 1; }

# Debian packages, installed when missing (as root; the package lists refreshed if need be).
install_packages() {
    [ "$(id -u)" = 0 ] || die "$* missing, and installing them needs root"
    say "installing $* from Debian's packages"
    export DEBIAN_FRONTEND=noninteractive
    timeout 900 apt-get install -y -q "$@" >"$WORK/apt.log" 2>&1 \
        || { timeout 300 apt-get update -q >>"$WORK/apt.log" 2>&1 && timeout 900 apt-get install -y -q "$@" >>"$WORK/apt.log" 2>&1; } \
        || { tail -5 "$WORK/apt.log" >&2; die "apt-get could not install $*"; }
}

# -- Docker and Compose --------------------------------------------------------------------------
if ! command -v dockerd >/dev/null; then
    install_packages docker.io
fi
if ! command -v docker-compose >/dev/null && ! docker compose version >/dev/null 2>&1; then
    install_packages docker-compose
fi
if ! docker info >/dev/null 2>&1; then
    say "starting dockerd"
    nohup dockerd >"$WORK/dockerd.log" 2>&1 &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { tail -20 "$WORK/dockerd.log" >&2; die "dockerd did not start"; }
fi
# A client that builds with BuildKit: buildx's, or Debian's (BuildKit built in) where the client
# first on PATH is a newer one without buildx.
DOCKER=docker
if ! docker buildx version >/dev/null 2>&1 && [ -x /usr/bin/docker ]; then
    DOCKER=/usr/bin/docker
fi
docker() { "$DOCKER" "$@"; }  # `timeout` runs binaries, not functions: it is given "$DOCKER"
if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
else
    COMPOSE=(docker-compose)
fi
say "using $("${COMPOSE[@]}" version --short 2>/dev/null || "${COMPOSE[@]}" version | head -1) and Docker $(docker version --format '{{.Server.Version}}')"
# BuildKit builds only the stages a target needs (Docker 20.10 has it built in).
export DOCKER_BUILDKIT=1 COMPOSE_DOCKER_CLI_BUILD=1

# -- stand-ins for images no registry serves -----------------------------------------------------
available() { docker image inspect "$1" >/dev/null 2>&1 || timeout 60 "$DOCKER" pull -q "$1" >/dev/null 2>&1; }
if ! available "$PYTHON_IMAGE"; then
    say "$PYTHON_IMAGE cannot be pulled: building a stand-in from Debian bookworm"
    command -v debootstrap >/dev/null || install_packages debootstrap
    timeout 900 debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
        bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -5 "$WORK/debootstrap.log" >&2; die "cannot build the Python stand-in: no Debian mirror at $MIRROR"; }
    # The host's CA bundle: this machine's registries are reached through its proxy.
    cp /etc/ssl/certs/ca-certificates.crt "$WORK/rootfs/etc/ssl/certs/ca-certificates.crt"
    tar -C "$WORK/rootfs" -c . | docker import \
        --change 'ENV LANG=C.UTF-8' --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
        --change 'CMD ["python3"]' --change 'LABEL lightloop.smoke.standin=python' - "$PYTHON_IMAGE" >/dev/null
fi
# The Postgres stand-in is built again each run (from the build cache: seconds), so that a change
# to deploy/smoke/postgres takes effect; an image that is not a stand-in is left alone.
standin() { [ -n "$(docker image inspect -f '{{index .Config.Labels "lightloop.smoke.standin"}}' "$1" 2>/dev/null)" ]; }
if standin "$POSTGRES_IMAGE" || ! available "$POSTGRES_IMAGE"; then
    say "$POSTGRES_IMAGE cannot be pulled: building a stand-in from Debian's PostgreSQL"
    timeout 900 "$DOCKER" build -q --build-arg BASE_IMAGE="$PYTHON_IMAGE" --label lightloop.smoke.standin=postgres \
        -t "$POSTGRES_IMAGE" deploy/smoke/postgres >/dev/null \
        || die "cannot build the Postgres stand-in"
fi

# -- lightloop's image, with the Dockerfile --------------------------------------------------------
build_args=()
if ! timeout 20 "$PYTHON" -c "import urllib.request; urllib.request.urlopen('https://download.pytorch.org/whl/cpu/', timeout=10)" 2>/dev/null; then
    # PyTorch's index is out of reach: the torch wheel this machine installs from, copied in.
    "$PYTHON" -m pip download -q --no-deps -d deploy/wheels "torch==$(sed -n 's/^ARG TORCH_VERSION=//p' deploy/Dockerfile)" \
        || die "no torch wheel for the image: neither PyTorch's index nor a local wheel"
    build_args=(--build-arg TORCH_INDEX_URL=none)
fi
# serve (proxy, engine, migrate) first; cpu (the trainer) is built on its layers.
size() { docker image inspect "$1" --format '{{.Size}}' | awk '{printf "%.2f GB", $1/1e9}'; }
for target in serve cpu; do
    say "building lightloop:$target"
    started=$(date +%s)
    timeout 1800 "$DOCKER" build -q -f deploy/Dockerfile --target "$target" "${build_args[@]}" -t "lightloop:$target" . >/dev/null \
        || die "docker build of lightloop:$target failed"
    say "built lightloop:$target in $(( $(date +%s) - started )) s: $(size "lightloop:$target")"
done
# The lean image holds what serving imports and nothing of training's.
docker run --rm --entrypoint python lightloop:serve -c 'import importlib.util as u, sys
import lightloop.proxy.server, lightloop.engine.server, lightloop.runner
held = [m for m in ("verl", "ray", "matplotlib") if u.find_spec(m)]
sys.exit(f"lightloop:serve holds {held}" if held else 0)' \
    || die "lightloop:serve is not lean: it cannot import the proxy and engine, or it holds VERL, Ray or matplotlib"
say "ok: lightloop:serve imports the proxy, engine and runner, without VERL, Ray or matplotlib"

# -- the stack ---------------------------------------------------------------------------------------
ENV_FILE="$WORK/smoke.env"
read -r PROXY_PORT POSTGRES_PORT < <("$PYTHON" -c '
import socket
a, b = socket.socket(), socket.socket()
a.bind(("127.0.0.1", 0)); b.bind(("127.0.0.1", 0))
print(a.getsockname()[1], b.getsockname()[1])')
cat >"$ENV_FILE" <<EOF
POSTGRES_PASSWORD=$("$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(16))')
LITELLM_MASTER_KEY=sk-$("$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(32))')
COMPOSE_PROFILES=cpu
PROXY_PORT=$PROXY_PORT
POSTGRES_PORT=$POSTGRES_PORT
POLICY_BASE_MODEL=tiny
ENGINE_MODEL=tiny
EOF
# Variables compose reads from the environment before the env file: the smoke's stack is its own.
CLEAN_ENV=(env -u POSTGRES_PASSWORD -u LITELLM_MASTER_KEY -u LIGHTLOOP_IMAGE -u LIGHTLOOP_TRAINER_IMAGE -u LIGHTLOOP_GPU_IMAGE \
    -u BIND_ADDRESS -u COMPOSE_FILE -u COMPOSE_PROFILES -u COMPOSE_PROJECT_NAME -u PROXY_PORT -u POSTGRES_PORT)
compose() { timeout 900 "${CLEAN_ENV[@]}" "${COMPOSE[@]}" --project-name "$PROJECT" --env-file "$ENV_FILE" -f deploy/compose.yaml "$@"; }
logs() { compose logs --no-color --tail 40 "$@" >&2 || true; }
cleanup() { compose down -v --remove-orphans >/dev/null 2>&1 || true; rm -rf --one-file-system "$WORK"; }
trap cleanup EXIT

# A missing secret stops compose before anything starts, naming it.
grep -v '^POSTGRES_PASSWORD=' "$ENV_FILE" >"$WORK/no-secret.env"
if "${CLEAN_ENV[@]}" "${COMPOSE[@]}" --project-name "$PROJECT" --env-file "$WORK/no-secret.env" -f deploy/compose.yaml config \
    >/dev/null 2>"$WORK/config.log"; then
    die "compose config accepted an env file without POSTGRES_PASSWORD"
fi
grep -q "set POSTGRES_PASSWORD in deploy/.env" "$WORK/config.log" \
    || { cat "$WORK/config.log" >&2; die "compose config did not name the missing POSTGRES_PASSWORD"; }
say "ok: compose config without POSTGRES_PASSWORD stops, naming it"

compose down -v --remove-orphans >/dev/null 2>&1 || true  # what an aborted run left behind
say "compose up"
compose up -d --no-build >/dev/null 2>"$WORK/up.log" || { cat "$WORK/up.log" >&2; logs; die "compose up failed"; }
set -a; . "$ENV_FILE"; set +a
export SMOKE_PROJECT="$PROJECT" SMOKE_COMPOSE="${COMPOSE[*]}" SMOKE_ENV_FILE="$ENV_FILE"
timeout 3600 "$PYTHON" deploy/smoke/check.py || die "the checks failed (above, with the service's last log lines)"
say "passed"
