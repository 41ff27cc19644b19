# kdsearch: every target installs first if .venv is missing.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PYTEST  ?= $(BIN)/python -m pytest
RUN     ?= runs

.PHONY: install test test-all demo lint bench clean

$(BIN)/kdsearch: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

install: $(BIN)/kdsearch

# The CPU suite (gpu tests skip without CUDA; postgres tests skip without a server unless CI=true).
test: install
	$(PYTEST) -q -m "not slow" tests

# Everything, including the slow paper-study smoke runs.
test-all: install
	$(PYTEST) -q tests

# A real short study, offline, on the CPU: digits + a ViT teacher fitted on the spot.
demo: install
	$(BIN)/kdsearch optimize --config studies/demo.yaml --run-dir $(RUN) --plain
	$(BIN)/kdsearch export --study-name demo --run-dir $(RUN) --pick "max val_accuracy" --out $(RUN)/demo/best-student
	$(BIN)/kdsearch report --study-name demo --run-dir $(RUN)

lint: install
	$(BIN)/ruff check kdsearch tests benchmarks studies

bench: install
	$(BIN)/python benchmarks/bench_kd_step.py
	$(BIN)/python benchmarks/bench_measure.py
	$(BIN)/python benchmarks/bench_trial_overhead.py

clean:
	rm -rf $(VENV) $(RUN) .pytest_cache
