#!/usr/bin/env bash
# Prepare what travels to the GPU machine with `make gpu-check` (see benchmarks/GPU.md):
#   .whl/   wheels for the packages the GPU machine lacks (it has its own torch, torchvision, timm,
#           numpy, pyyaml, rich, safetensors, filelock, nvidia-ml-py, tqdm, pytest, onnxruntime)
#   .data/  the JPEG CIFAR-10 archive from ../shared/data (../shared does not travel)
# Both folders are git-ignored; name them in the device call's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
# Versions as installed in this checkout's venv, so both machines run the same code.
PKGS=(optuna==5.0.0 alembic==1.20.1 colorlog==6.12.0 mako==1.4.3 sqlalchemy==2.1.9 greenlet ptflops==0.7.5 plotly==7.1.0 narwhals==2.29.0)
# zeus (energy windows) and what it needs beyond the machine's own numpy/scikit-learn/scipy
PKGS+=(zeus==0.16.0 pandas==3.1.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1 httpx==0.28.1 httpcore==1.0.9 h11==0.16.0 anyio==4.16.0
  certifi idna amdsmi==7.0.2 python-dateutil==4.0.0 tzdata typing-extensions)
mkdir -p .whl .data
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "${PKGS[@]}"
SHARED=${SHARED:-../shared}
if [ -f "$SHARED/data/cifar10-jpeg.tar.gz" ]; then
  cp -u "$SHARED/data/cifar10-jpeg.tar.gz" .data/
else
  echo "gpu-carry: $SHARED/data/cifar10-jpeg.tar.gz not found; the study step will be skipped" >&2
fi
du -sh .whl .data
