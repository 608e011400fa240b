#!/usr/bin/env bash
# The GPU checks #7 still owes (RESULTS.md part 4, "Not yet measured on a GPU"), as one command that ends inside
# the device tool's 10-minute limit on an H100/H200 with its stock image (torch, transformers, lightning: enough;
# the Hydra/decord test fixtures are left out with --noconftest). In order of what matters most:
#   1. the CUDA tests (~100 s): the fused short-sequence kernel against float64 SDPA, every scheme in bf16;
#   2. the attention kernels alone (the fused kernel's "short fused" column against the matmul path), then the fused
#      kernel at each launch that fits its registers, forward and backward apart (~13 launches, a Triton compile
#      each: ~30 s; which launch `default_launch` should pick, and its GB/s against the H200's 4.8 TB/s);
#   3. training: train.py's model compiled, the same with the fused kernel, and HF compiled ("2x HF" against HF
#      compiled has never been measured);
#   4. train.py's loop against the bare step (the deferred non-finite check), if the budget leaves time (it starts
#      only where the training section ended within 280 s; otherwise run `gpu.py --only lightning` in a next call).
# Expected: tests <= 150 s, then ~6 min of gpu.py (three compiles of ~60-90 s), ~9 min in all.
# Usage: bash benchmarks/gpu_session.sh [OUT_DIR]   (the device tool: bash benchmarks/gpu_session.sh "$OUT")
set -uo pipefail
out=${1:-benchmarks/results}
mkdir -p "$out"
# At once, not after the time limit: without CUDA gpu.py refuses the full sizes, and without pytest the CUDA tests
# would be lost to one line of the log
python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "torch sees no CUDA device")' || exit 1
python3 -c 'import pytest' || { echo "pytest is missing: the CUDA tests cannot run (pip install pytest)"; exit 1; }
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
timeout 150 python3 -m pytest -q --noconftest -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log"
# Sections that would start after 280 s are skipped (each compile takes ~60-80 s on an H200).
python3 benchmarks/gpu.py --only attention fused_launch training lightning --profile --budget-s 280 --out "$out" --variants \
    "HF eager" "ours torch.compile, bf16 residual stream" \
    "ours torch.compile, bf16 residual stream, fused short attention" \
    "HF torch.compile" 2>&1 | tee "$out/gpu.log"
