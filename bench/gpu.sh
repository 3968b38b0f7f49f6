#!/usr/bin/env bash
# The GPU figures, in one short run on a lent GPU machine: under 10 minutes in all. Each script
# is cut off by `timeout` (rows printed so far are kept): the wheels (about 20 s), the whole
# encode-latents stage against the bare VAE, the naive loop and its own pipeline with the
# encoder replaced by zeros (bench/encode_latents.py, 200 s; GPU_ENCODE=0 skips it); with
# GPU_TEXT=1 the prx-1.2b trainer (compiled) with T5Gemma-2B's whole encoder run every step
# against the same run reading stored caption embeddings (curate encode-text's text shards;
# bench/gpu_train.py --feeds shards,text, 300 s: run it as `GPU_ENCODE=0 GPU_TEXT=1 bash
# bench/gpu.sh` on the machine still warm from the first call); then, with GPU_TRAIN=1, the trainer as the prx-1.2b preset runs it (compiled) fed by shards
# and by memory (bench/gpu_train.py, 230 s) and eager from memory (150 s). The encoder-only
# figures (bench/gpu_vae.py: Flux, FLUX.2 and DC-AE) run too with GPU_VAE=1: a further 220 s. GPU_ABLATIONS=1 times the
# prx-1.2b step fed from memory as the baseline and with `--ablation muon`, `ema` and `tread`
# (420 s; run it alone: GPU_ENCODE=0 GPU_ABLATIONS=1); GPU_REPA=1 the shard-fed step against the
# same with `--ablation repa` and `irepa` (a DINOv3 ViT-B/16-shaped teacher, noise JPEGs as originals; 380 s); GPU_SCORE=1 the
# whole `curate score` stage against the bare CLIP ViT-L/14 towers on 2048 images (bench/score.py, 200 s), then a ViT-B/16
# NSFW classifier alone (100 s); GPU_RECOMPUTE=1 activation checkpointing's memory and time per step at
# PRX-1.2B's size and 1024 px (bench/recompute.py, eager, 240 s); GPU_PIXELS=1 the prx-1.2b step in pixel
# space (512 px, 32 px patches through a 256-wide bottleneck: Flux's 256 tokens) fed from memory, and with
# `--ablation x-pred`, `lpips` and `pdino` (random VGG16 and DINOv2-B/14-reg; 420 s; against GPU_ABLATIONS'
# Flux baseline, on the same machine). BENCHMARKS.md holds the
# trainer's and the encoder-only figures already (session 3), so by default only the first
# part runs: about 4 minutes with the machine's start.
#
# Those machines have torch 2.11, transformers 5.17, safetensors, pyyaml, pyarrow, numpy, tqdm,
# pillow and tensorboard (the benchmarks turn it off anyway: log.tensorboard=false), but not
# diffusers, webdataset, polars, pydantic or ftfy, and nothing can be fetched there. Their wheels
# travel in .carry/ (git-ignored through .git/info/exclude; name ".carry" in the run's carry).
# Fill it here, on a machine with the package index, from the repository root:
#
#   pip download --no-deps --python-version 3.12 --implementation cp --only-binary=:all: \
#     --platform manylinux2014_x86_64 -d .carry \
#     diffusers==0.42.1 webdataset==0.2.111 braceexpand==0.1.7 polars==1.30.0 \
#     pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#     typing_extensions==4.16.0 ftfy==6.3.1 wcwidth==0.9.4 lpips==0.1.4
#   du -cb .carry/*.whl | tail -1     # 46,378,938 bytes (44.2 MiB) with these versions, before lpips (54 kB)
#
# A call carries at most 64 MiB, the working tree (about 2 MiB) included. polars 1.30 is one
# 36 MB wheel; polars 2.x's runtime wheel alone is 54 MB, which leaves no room for the rest.
# pydantic 2.14 needs typing_extensions >= 4.16, newer than some images hold. Keep exactly one
# wheel per package in .carry/. Then run on the machine: bash bench/gpu.sh (figures in $OUT).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp}"
export PYTHONUNBUFFERED=1  # rows reach tee (and $OUT) even when timeout stops a script
PY="${PYTHON:-python}"
if compgen -G ".carry/*.whl" >/dev/null; then
    # Into a folder of their own, ahead on the path: the image's packages stay untouched.
    timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/kiln-site .carry/*.whl
    export PYTHONPATH="/tmp/kiln-site${PYTHONPATH:+:$PYTHONPATH}"
elif ! "$PY" -c "import diffusers, polars, pydantic, webdataset, ftfy" 2>/dev/null; then
    # A lent machine reaches no index, and pip's retries would spend minutes of its time: fail
    # at once there. Elsewhere (a GPU box of your own) this installs what is missing.
    timeout 120 "$PY" -m pip install -q --retries 0 --timeout 10 diffusers webdataset polars pydantic ftfy || {
        echo "no wheels in .carry/ and no package index: fill .carry/ (the command at the top of" \
             "bench/gpu.sh) and name it in the run's carry" >&2
        exit 3
    }
fi
"$PY" -c "import torch, transformers, diffusers, polars, pydantic, webdataset, ftfy; print('torch', \
torch.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__, \
'polars', polars.__version__, 'pydantic', pydantic.VERSION)"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
if [ "${GPU_VAE:-0}" = 1 ]; then
    timeout -k 10 220 "$PY" bench/gpu_vae.py --iters 20 | tee "$OUT/gpu_vae.md" \
        || echo "bench/gpu_vae.py stopped early (exit $?)"
fi
if [ "${GPU_ENCODE:-1}" = 1 ]; then
    # 2048 images: at about 500 images/s the encoder needs 4 s for them, enough to see past the
    # stage's fixed costs (loading the VAE, starting the decoding workers).
    timeout -k 10 200 "$PY" bench/encode_latents.py --device cuda --images 2048 --tiny-images 1024 \
        --batch-size 32 --decode-workers 8 --compile | tee "$OUT/gpu_encode_latents.md" \
        || echo "bench/encode_latents.py stopped early (exit $?)"
fi
if [ "${GPU_TEXT:-0}" = 1 ]; then  # stored caption embeddings against T5Gemma-2B (all 26 layers) per step
    timeout -k 10 300 "$PY" bench/gpu_train.py --text-layers 26 --feeds shards,text --steps 5 --shards 16 \
        | tee "$OUT/gpu_train_text.md" || echo "bench/gpu_train.py --feeds shards,text stopped early (exit $?)"
fi
if [ "${GPU_ABLATIONS:-0}" = 1 ]; then  # Muon's and EMA's cost, TREAD's saving per step at prx-1.2b (compiled)
    timeout -k 10 420 "$PY" bench/gpu_train.py --feeds memory --ablations muon,ema,tread --steps 5 \
        | tee "$OUT/gpu_train_ablations.md" || echo "bench/gpu_train.py --ablations stopped early (exit $?)"
fi
if [ "${GPU_SCORE:-0}" = 1 ]; then  # curate score (CLIP ViT-L/14, bf16 autocast) against its bare towers
    timeout -k 10 200 "$PY" bench/score.py --device cuda --images 2048 --batch-size 128 --workers 8 --repeats 1 \
        | tee "$OUT/gpu_score.md" || echo "bench/score.py stopped early (exit $?)"
    timeout -k 10 100 "$PY" bench/score.py --classifier --device cuda --images 2048 --batch-size 256 --workers 8 \
        --repeats 1 | tee "$OUT/gpu_score_classifier.md" || echo "bench/score.py --classifier stopped early (exit $?)"
fi
if [ "${GPU_REPA:-0}" = 1 ]; then  # REPA's cost per step at prx-1.2b: DINOv3-B teacher, originals decoded
    timeout -k 10 380 "$PY" bench/gpu_train.py --feeds shards --ablations repa,irepa --steps 5 \
        | tee "$OUT/gpu_train_repa.md" || echo "bench/gpu_train.py --ablations repa,irepa stopped early (exit $?)"
fi
if [ "${GPU_RECOMPUTE:-0}" = 1 ]; then  # activation checkpointing: PRX-1.2B's blocks at 1024 px, 4 samples a step
    timeout -k 10 240 "$PY" bench/recompute.py --device cuda --depth 16 --width 1792 --side 128 --batch 4 \
        --steps 5 --repeats 1 | tee "$OUT/gpu_recompute.md" || echo "bench/recompute.py stopped early (exit $?)"
fi
if [ "${GPU_PIXELS:-0}" = 1 ]; then  # pixel space and its perceptual losses per step at prx-1.2b (compiled)
    timeout -k 10 420 "$PY" bench/gpu_train.py --feeds memory --latents pixels --ablations x-pred,lpips,pdino \
        --steps 5 | tee "$OUT/gpu_train_pixels.md" || echo "bench/gpu_train.py --latents pixels stopped early (exit $?)"
fi
if [ "${GPU_TRAIN:-0}" = 1 ]; then  # GPU_TRAIN=1: the trainer's figures too (BENCHMARKS.md has them)
    # As the preset runs (compiled; 3 warm-up steps hold the compiling), then eager from memory.
    timeout -k 10 230 "$PY" bench/gpu_train.py --steps 8 | tee "$OUT/gpu_train.md" \
        || echo "bench/gpu_train.py stopped early (exit $?)"
    timeout -k 10 150 "$PY" bench/gpu_train.py --eager --feeds memory --steps 6 \
        | tee "$OUT/gpu_train_eager.md" || echo "bench/gpu_train.py --eager stopped early (exit $?)"
fi
