#!/usr/bin/env bash
# The GPU figures, in one short run on a lent GPU machine (well under 8 minutes).
# Those machines have torch and transformers but no diffusers: a wheel is carried in .carry/
# (pip download --no-deps -d .carry diffusers), else pip installs it.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp}"
python -m pip install -q --no-deps .carry/diffusers-*.whl 2>/dev/null || python -m pip install -q --no-deps diffusers
python -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
python bench/gpu_vae.py --iters 20 | tee "$OUT/gpu_vae.md"
