# kdsearch: every target installs first if .venv is missing.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PYTEST  ?= $(BIN)/python -m pytest
RUN     ?= runs

.PHONY: install test test-all test-floors demo lint bench gpu-check gpu-carry clean

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

# The oldest torch, torchvision, timm and optuna kdsearch supports: the floors of pyproject.toml
# (">=" read as "=="), installed in a second venv, and the end-to-end part of the suite on them
# (a smoke study, trials, export incl. ONNX, the report, the study/sampler code, precision and
# device decisions). See benchmarks/RESULTS.md for its time.
FLOORS_VENV ?= .venv-floors
FLOORS_PINS = $(shell $(PY) -c 'import re, tomllib; d = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; print(" ".join(r.replace(">=", "==") for r in d if re.split("[<>=]", r)[0] in ("torch", "torchvision", "timm", "optuna")))')
FLOORS_TESTS ?= tests/test_cli_e2e.py tests/report/test_report_html.py tests/export/test_export.py tests/search/test_study.py \
	tests/distill/test_precision.py tests/distill/test_compile.py tests/measure/test_device.py tests/measure/test_latency_ort.py

$(FLOORS_VENV)/bin/kdsearch: pyproject.toml
	$(PY) -m venv $(FLOORS_VENV)
	$(FLOORS_VENV)/bin/pip install -q --upgrade pip
	$(FLOORS_VENV)/bin/pip install -q $(FLOORS_PINS) -e '.[dev]'
	@touch $@

test-floors: $(FLOORS_VENV)/bin/kdsearch
	$(FLOORS_VENV)/bin/python -c 'import torch, torchvision, timm, optuna; print("floors:", torch.__version__, torchvision.__version__, timm.__version__, optuna.__version__)'
	$(FLOORS_VENV)/bin/python -m pytest -q -m "not slow" $(FLOORS_TESTS)

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
	rm -rf $(VENV) $(FLOORS_VENV) $(RUN) .pytest_cache gpu-check-out
