# kdsearch: every target installs first if .venv is missing.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PYTEST  ?= $(BIN)/python -m pytest
RUN     ?= runs

.PHONY: install test test-all demo lint bench gpu-check gpu-carry clean

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

# Every GPU claim in one prepared run (< 6 min on one H100/H200); see benchmarks/GPU.md.
# GPU_CHECK_DRY=1: the same steps with tiny sizes on the CPU (< 2 min). No install step: the GPU
# machine brings its own torch and gets the rest as carried wheels.
GPU_CHECK_DRY ?=
GPU_CHECK_OUT ?= gpu-check-out
GPU_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	GPU_CHECK_DRY=$(GPU_CHECK_DRY) $(GPU_PY) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT)

# Prepare what travels to the GPU machine: wheels in .whl/, JPEG CIFAR-10 in .data/ (both ignored).
gpu-carry:
	bash benchmarks/gpu_carry.sh

clean:
	rm -rf $(VENV) $(RUN) .pytest_cache gpu-check-out
