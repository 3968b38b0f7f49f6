#!/usr/bin/env bash
# The whole pipeline on the bundled images with tiny local models. Run it with `make demo`.
# Every stage is resumable: running the demo again skips what is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=demo/out

echo "== 1. ingest: demo/images -> $DATA/images"
curate ingest demo/images --out "$DATA/images" --shard-size 16 --workers 2 --no-progress

echo "== stats"
curate stats "$DATA/images"

echo "== 2. a tiny vision-language model: the real Qwen2-VL classes, randomly initialised, saved locally"
python -m curate.tiny qwen2-vl "$DATA/models/tiny-qwen2-vl"

echo "== 3. recaption: long and short captions (random weights: expect nonsense, and the QA rejecting some)"
# demo/prompts.json keeps the real prompts' shape with small token limits so the demo runs in a minute on a CPU.
curate recaption "$DATA/images" --out "$DATA/captions/tiny-qwen2-vl" --model "$DATA/models/tiny-qwen2-vl" \
    --backend transformers --prompts demo/prompts.json --batch-size 8 --max-pixels 65536 --decode-workers 2 \
    --no-progress
curate stats "$DATA/captions/tiny-qwen2-vl" --plot "$DATA/captions/tiny-qwen2-vl-lengths.png"

echo "== 4. a tiny FLUX.2 autoencoder (the real AutoencoderKLFlux2 class, randomly initialised)"
python -m curate.tiny flux2-vae "$DATA/models/tiny-flux2-vae"

echo "== 5. encode-latents: training shards and manifests/demo-{long,short,mix}.json"
# Random-weight captions are often rejected; --allow-missing-captions keeps those images (with their
# original caption) so that the demo always has data to train on. Real runs leave it off.
curate encode-latents "$DATA/images" --captions "$DATA/captions/tiny-qwen2-vl" --out "$DATA/latents/tiny-flux2-256" \
    --vae "$DATA/models/tiny-flux2-vae" --resolution 256 --buckets --batch-size 8 --decode-workers 2 \
    --allow-missing-captions --manifest-dir manifests --name demo --device cpu --no-progress
curate stats "$DATA/latents/tiny-flux2-256"
# Another caption selection of the same shards: DALL-E 3's 95% synthetic, 5% original captions.
curate manifest manifests/demo-long.json --captions long=0.95,orig=0.05 --name demo-dalle3
# Per-image scores to filter on: each caption's CLIP similarity to its image and VQAScore (a second
# VLM, not the captioner, asked whether the image shows the caption), and an NSFW classifier's
# probability (a tiny random CLIP, Qwen2.5-VL and ViT here, so the numbers mean nothing; real runs use
# --model clip-score, CLIP ViT-L/14, --aesthetic, --vqa qwen2.5-vl-3b, and --classifier nsfw or watermark).
python -m curate.tiny clip-score "$DATA/models/tiny-clip-score"
python -m curate.tiny nsfw "$DATA/models/tiny-nsfw"
python -m curate.tiny qwen2.5-vl "$DATA/models/tiny-qwen2.5-vl"
curate score "$DATA/images" --captions "$DATA/captions/tiny-qwen2-vl" --out "$DATA/scores/tiny-clip" \
    --model "$DATA/models/tiny-clip-score" --classifier "$DATA/models/tiny-nsfw:nsfw" --embeddings \
    --vqa "$DATA/models/tiny-qwen2.5-vl" --decode-workers 2 --device cpu --no-progress
# Semantic near-duplicates over the stored image embeddings (the tiny CLIP sees little difference
# between images, hence the high threshold; real runs use about 0.95 with CLIP ViT-L/14).
curate dedup "$DATA/scores/tiny-clip" --threshold 0.998 --cluster-size 16 --device cpu
# A subset of the samples, with no shard written again: large originals whose caption matches them,
# without the near-duplicates.
curate manifest manifests/demo-long.json --where 'orig_w >= 400 AND orig_h >= 300' \
    --scores "$DATA/scores/tiny-clip" --where 'clip_orig >= -0.1' --where 'nsfw < 0.9' \
    --exclude "$DATA/scores/tiny-clip/duplicates-0.998.parquet" --name demo-hires
ls -l manifests/demo-*.json

echo "== 6. a tiny T5Gemma text encoder (the real class PRXPipeline loads, randomly initialised)"
python -m curate.tiny t5gemma "$DATA/models/tiny-t5gemma"

echo "== 7. encode-text: every caption's T5Gemma embedding, and manifests/demo-{long,short,mix}-t5gemma.json"
# Training then reads the embeddings instead of running the text encoder every step. --max-tokens
# is the tiny preset's (PRX's presets use 256, the default).
curate encode-text "$DATA/latents/tiny-flux2-256" --out "$DATA/text/t5gemma" --text-encoder "$DATA/models/tiny-t5gemma" \
    --max-tokens 64 --workers 1 --device cpu --no-progress
ls -l manifests/demo-*-t5gemma.json
curate stats manifests/demo-long-t5gemma.json --latents 256   # what training will read: buckets, caption coverage, text, input scale

echo "== 8. train: the tiny preset on all shards but one, a validation loss on that one, a sample grid every 100 steps"
# --hold-out 1 writes demo-train.json (the other shards) and demo-train-heldout.json (one shard, drawn at random):
# the held-out loss (val.shards) measures the same samples, timesteps and noise every 50 steps.
curate manifest manifests/demo-long-t5gemma.json --hold-out 1 --name demo-train
# Decontamination: the training images that near-copy a held-out one would flatter the held-out loss
# and FID; --against lists them (over the stored CLIP embeddings) and --exclude leaves them out. (The
# tiny random CLIP finds every pair of images alike, hence the threshold; real runs use about 0.95.)
curate dedup "$DATA/scores/tiny-clip" --against manifests/demo-train-heldout.json --threshold 0.997 --device cpu
curate manifest manifests/demo-train.json --exclude "$DATA/scores/tiny-clip/duplicates-of-demo-train-heldout-0.997.parquet" \
    --name demo-train-clean
# --resume auto makes a rerun of the demo continue (or find finished) the same run.
# data.sample_latents=false trains on the stored means: the random tiny autoencoder's latent std is
# about 1 (a trained VAE's is far smaller), so fresh draws would bury the means in noise.
train --shards manifests/demo-train-clean.json --out "$DATA/runs/base" --preset tiny --resume auto \
    text_encoder="$DATA/models/tiny-t5gemma" steps=200 log.every=20 sample_every=100 data.workers=2 \
    data.sample_latents=false val.shards=manifests/demo-train-heldout.json val.every=50
tail -n 2 "$DATA/runs/base/metrics.jsonl"
ls -l "$DATA/runs/base/samples"

echo "== 9. export for diffusers' PRXPipeline, then generate from the exported folder"
train export "$DATA/runs/base" --to "$DATA/export/base"
train generate "$DATA/export/base" "a red fox in the snow" --steps 8 --out "$DATA/export/base-sample.png"

echo "== 10. evaluate: FID, KID, CMMD, DINO-MMD, FD-DINOv2, the CLIP score and VQAScore of the run's last checkpoint"
# Tiny random CLIP and DINOv2 (the real classes) stand in for CMMD's, DINO-MMD's and the CLIP score's networks,
# the tiny Qwen2.5-VL of step 5 (the scores) for VQAScore's judge, which gives "Yes" a few millionths
# (about one token's share of its 150k-token vocabulary); --samples 48 takes every image of the run's training shards; so few give a
# biased FID (real evaluations use 10,000 or more): the command says so.
python -m curate.tiny clip "$DATA/models/tiny-clip"
python -m curate.tiny dinov2 "$DATA/models/tiny-dinov2"
evaluate run "$DATA/runs/base" --samples 48 --steps 8 --clip "$DATA/models/tiny-clip" \
    --dino "$DATA/models/tiny-dinov2" --metrics fid,kid,cmmd,dino-mmd,fd-dinov2,clip-score,vqa-score \
    --clip-score "$DATA/models/tiny-clip-score" --vqa-model "$DATA/models/tiny-qwen2.5-vl" --no-progress
evaluate compare "$DATA/runs/base"
# The export measured as a released model is (`evaluate pipeline prx-256 ...` measures Photoroom's own):
# its denoiser, text encoder and VAE through the same sampler give the run's FID, CMMD and DINO-MMD.
evaluate pipeline "$DATA/export/base" --out "$DATA/evals/export-base" --manifest manifests/demo-train-clean.json \
    --samples 48 --steps 8 --clip "$DATA/models/tiny-clip" --dino "$DATA/models/tiny-dinov2" --no-progress
evaluate compare "$DATA/runs/base" "$DATA/evals/export-base"

echo "== 11. an ablation, one switch away: the same run with REPA (a tiny DINOv3 teacher), side by side"
# --ablation repa aligns block 1's tokens with the teacher's patch features of the original images,
# which the loader reads from the image stage the manifest names (step 1's output). The table shows
# the keys the two runs differ in: the ablation.
python -m curate.tiny dinov3 "$DATA/models/tiny-dinov3"
train --shards manifests/demo-train-clean.json --out "$DATA/runs/repa" --preset tiny --ablation repa \
    --resume auto text_encoder="$DATA/models/tiny-t5gemma" repa.encoder="$DATA/models/tiny-dinov3" steps=200 \
    log.every=20 sample_every=100 data.workers=2 data.sample_latents=false \
    val.shards=manifests/demo-train-heldout.json val.every=50
evaluate run "$DATA/runs/repa" --samples 48 --steps 8 --clip "$DATA/models/tiny-clip" \
    --dino "$DATA/models/tiny-dinov2" --metrics fid,kid,cmmd,dino-mmd,clip-score \
    --clip-score "$DATA/models/tiny-clip-score" --no-progress
evaluate compare "$DATA/runs/base" "$DATA/runs/repa"

echo "== 12. the next stage: the larger images at 512 px, training on from the 256 px run's weights"
# Stage by stage, as PRX, SD3 and PixArt train: latents at the new resolution (the same tiny
# autoencoder) of the images that have about that many pixels (--where: the others are recorded
# filtered_out and never decoded), then a new run that starts from the last one's weights with a
# new optimizer and warm-up. The log notes the change of resolution.
curate encode-latents "$DATA/images" --captions "$DATA/captions/tiny-qwen2-vl" --out "$DATA/latents/tiny-flux2-512" \
    --vae "$DATA/models/tiny-flux2-vae" --resolution 512 --buckets --batch-size 8 --decode-workers 2 \
    --where 'width >= 384 AND height >= 384' --allow-missing-captions --manifest-dir manifests --name demo-512 \
    --device cpu --no-progress
train --shards manifests/demo-512-long.json --out "$DATA/runs/stage2-512" --preset tiny --init-from "$DATA/runs/base" \
    --resume auto text_encoder="$DATA/models/tiny-t5gemma" steps=40 log.every=20 sample_every=40 data.workers=2 \
    data.sample_latents=false flow.shift=2
tail -n 1 "$DATA/runs/stage2-512/metrics.jsonl"
