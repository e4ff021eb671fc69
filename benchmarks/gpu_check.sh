#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): on a machine with CUDA, within minutes, whether the project
# runs there, decides as on the CPU, and how fast; without CUDA, a dry run on the CPU that exits 0.
#   bash benchmarks/gpu_check.sh [--rows 2000] [--out benchmarks/results/gpu_check.md]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
# deterministic cuBLAS (the device tests compare bytes); TF32 is switched off inside
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"
exec python benchmarks/gpu_check.py "$@"
