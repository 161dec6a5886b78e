#!/usr/bin/env bash
# The GPU check of the speed work, as one command from the working tree (no install: PyTorch alone, no Ray,
# clean-fid or tqdm needed): the step anatomy of the cifar10 paper config (Stage 1 batch 128, K = 50) on one
# CUDA device, fp32 vs bf16, eager vs compiled. Results go to $OUT (or benchmarks/results).
#
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
PYTHONPATH=. exec "${PYTHON:-python}" benchmarks/step_anatomy.py --preset cifar10 --device cuda \
  --variants fp32/none,bf16/none,bf16/default --out "${OUT:-benchmarks/results}" "$@"
