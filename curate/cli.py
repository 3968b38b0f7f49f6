"""The `curate` command: one subcommand per stage, all on the shared runner."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from curate.manifest import Manifest
    from curate.subset import SubsetRules

# Stage modules are imported inside the commands: decoding workers are spawned processes that
# re-import the entry script, and they should not pay for polars and pyarrow.


def _default_workers() -> int:
    from curate.procs import available_cores
    from curate.runner import local_world_size

    # Several workers on a node (torchrun's ranks, srun's tasks) split its cores between them,
    # unless each was already bound to its own share (srun's CPU binding, taskset).
    cores, local = available_cores(), local_world_size()
    if local > 1 and cores >= (os.cpu_count() or cores):
        cores //= local
    return max(1, cores)


def _add_worker_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scaling out (defaults from torchrun's RANK/WORLD_SIZE or Slurm)")
    g.add_argument("--rank", type=int, default=None, help="this worker's index")
    g.add_argument("--world-size", type=int, default=None, help="number of workers")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_selection_args(p: argparse.ArgumentParser, what: str, seed_option: str = "--seed") -> None:
    """--where, --scores, --keep, --exclude, --fraction: the rules of curate.subset, for ``what``."""
    g = p.add_argument_group(f"which samples ({what}; curate.subset)")
    g.add_argument("--where", action="append", default=[], metavar="EXPR",
                   help="keep only the samples for which this SQL expression is true; repeatable (all must hold)")
    g.add_argument("--scores", action="append", default=[], metavar="TABLE",
                   help="a table (parquet, csv, tsv, jsonl) of per-sample values by key or source, or a `curate "
                        "score` folder, whose columns --where can name; repeatable")
    g.add_argument("--keep", default=None, metavar="TABLE",
                   help="keep only the samples it lists (a table with a key or source column, or a .txt of keys)")
    g.add_argument("--exclude", action="append", default=[], metavar="TABLE",
                   help="drop the samples it lists (as --keep); repeatable (curate dedup's tables, of duplicates and "
                        "of near-copies of evaluation images)")
    g.add_argument("--fraction", type=float, default=None, metavar="F",
                   help=f"keep a random fraction F of the samples, drawn per sample from ({seed_option}, key)")
    g.add_argument(seed_option, type=int, default=0, dest="fraction_seed", help="seed of --fraction's draw")


# What the rules of the stages that read the image stage (recaption, encode-latents) see.
_IMAGE_RULES = ("over the image stage's columns (width, height, bytes, format, source, caption, image_flags) and "
                "--scores (a `curate score` folder)")


def _selection(args: argparse.Namespace) -> SubsetRules:
    from curate.runner import CurateError
    from curate.storage import as_location
    from curate.subset import SubsetRules

    # Each table or score folder a path here or a URL (as_location: Path would fold "s3://" to "s3:/").
    rules = SubsetRules(where=args.where, scores=[as_location(p) for p in args.scores],
                        keep=as_location(args.keep) if args.keep else None,
                        exclude=[as_location(p) for p in args.exclude],
                        fraction=args.fraction, seed=args.fraction_seed, unique=getattr(args, "unique", False))
    if rules.scores and not rules.where:
        raise CurateError("--scores only gives columns to --where: say which samples to keep with --where")
    return rules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curate", description="Curate image-text data into training shards.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="images from a folder, URL list, webdataset tars, parquet files of images or "
                                      "HF dataset into shards",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("src", help="folder of images | URL list (.parquet .csv .tsv .jsonl .txt) | tar file, "
                               "folder or pattern ('shards/{00000..00009}.tar') | parquet files holding the images "
                               "(file, folder or pattern) | the last two also at URLs (s3://, gs://, https://, "
                               "hf://datasets/...) | hf:NAME[:SPLIT] | datasets save_to_disk folder")
    p.add_argument("--out", required=True, help="output stage folder, e.g. DATA/images, or a URL (s3://...: uploaded shard by shard)")
    p.add_argument("--shard-size", type=int, default=1000, help="input samples per output shard")
    p.add_argument("--min-side", type=int, default=64, help="reject images whose short side is smaller")
    p.add_argument("--max-pixels", type=int, default=89_478_485,
                   help="reject images declaring more pixels, before decoding them")
    p.add_argument("--near-duplicates", type=int, default=None, metavar="BITS",
                   help="also reject images whose 64-bit perceptual hash (pHash) is within BITS of an "
                        "earlier kept image's (re-encoded, resized, lightly edited copies; 4 is strict, 10 "
                        "loose; 0 to 8); off by default: exact duplicates only")
    p.add_argument("--workers", type=int, default=_default_workers(), help="decoding processes")
    p.add_argument("--source-type", choices=["auto", "folder", "urls", "tars", "parquet", "hf"], default="auto")
    p.add_argument("--order", choices=["spread", "path"], default=None,
                   help="folders: how images are ordered into shards: spread (by a hash of the path, so every shard "
                        "samples every subfolder; the default) or path (sorted); default: spread, or path to "
                        "continue a stage ingested in path order")
    p.add_argument("--url-column", default=None, help="URL lists: the URL column (detected if omitted)")
    p.add_argument("--caption-column", default=None, help="URL lists and HF datasets: the caption column")
    p.add_argument("--image-column", default=None,
                   help="HF datasets and parquet files of images: the image column (detected if omitted)")
    p.add_argument("--split", default=None, help="HF datasets: the split (default train)")
    p.add_argument("--download-threads", type=int, default=32, help="URL lists: threads per process")
    p.add_argument("--download-timeout", type=int, default=10, help="URL lists: seconds per request")
    p.add_argument("--download-retries", type=int, default=2, help="URL lists: retries per URL")
    _add_worker_args(p)

    p = sub.add_parser("recaption", help="long and short captions from a vision-language model",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("images", help="an image stage folder written by `curate ingest`, e.g. DATA/images, or its "
                                  "URL (s3://, gs://, https://...)")
    p.add_argument("--out", required=True, help="output folder, e.g. DATA/captions/qwen2vl, or a URL (s3://...: uploaded shard by shard)")
    p.add_argument("--model", default="qwen2-vl",
                   help="alias (qwen2-vl, qwen2-vl-2b, qwen2.5-vl, qwen2.5-vl-3b, qwen3-vl), Hub id or local folder;"
                        " with --backend openai, the served model name")
    p.add_argument("--revision", default=None, help="pinned Hub revision (commit hash or tag)")
    p.add_argument("--backend", choices=["auto", "transformers", "vllm", "openai"], default="auto",
                   help="auto: openai with --endpoint, else vllm if installed and a GPU is present, else transformers")
    p.add_argument("--endpoint", default=None, help="openai: base URL of the server, e.g. http://localhost:8000/v1")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="openai: environment variable holding the API key (never logged)")
    p.add_argument("--batch-size", type=int, default=8, help="transformers: images per generate call")
    p.add_argument("--concurrency", type=int, default=32, help="openai: requests in flight")
    p.add_argument("--prompts", action="append", default=[],
                   help="extra prompt file (.json like curate/prompt_sets/default.json, or .txt: one variant "
                        "named after the file); repeatable")
    p.add_argument("--variants", help="caption variants to generate, in order (default: long,short)")
    p.add_argument("--max-pixels", type=int, default=802_816, help="images are downscaled to at most this area")
    p.add_argument("--use-orig-caption", action="store_true",
                   help="give the model the image's original alt-text as context")
    p.add_argument("--retries", type=int, default=2, help="new tries for a flagged caption")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    _add_selection_args(p, "images the model captions, the others recorded as filtered_out and left out by "
                           f"encode-latents too: {_IMAGE_RULES}", "--fraction-seed")
    p.add_argument("--decode-workers", type=int, default=min(4, _default_workers()),
                   help="DataLoader processes decoding and resizing images")
    _add_worker_args(p)

    p = sub.add_parser("encode-latents", help="VAE latents and captions into training shards, and the manifests",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("images", help="an image stage folder written by `curate ingest`, or its URL")
    p.add_argument("--captions", default=None, help="a caption stage folder written by `curate recaption`")
    p.add_argument("--out", required=True, help="output folder, e.g. DATA/latents/flux2-256, or a URL (s3://...: uploaded shard by shard)")
    p.add_argument("--vae", default="flux2",
                   help="alias (flux, flux2, repa-e-flux, dc-ae), Hub id or local folder; pixels: no VAE, the images "
                        "themselves (pixel-space training)")
    p.add_argument("--vae-class", default=None, help="diffusers class for a Hub id or folder (read from its config)")
    p.add_argument("--revision", default=None, help="pinned Hub revision of the VAE")
    p.add_argument("--resolution", type=int, default=256, help="side of the square target (its area with buckets)")
    p.add_argument("--buckets", action="store_true", help="aspect-ratio buckets of about resolution**2 pixels")
    p.add_argument("--bucket-multiple", type=int, default=16,
                   help="bucket sides divisible by this (VAE downsampling x denoiser patch)")
    p.add_argument("--store", choices=["dist", "mean"], default=None,
                   help="dist: mean and std, training samples a fresh latent each epoch; mean: the mean only "
                        "(default: dist; pixels and deterministic encoders such as DC-AE: mean, they have no "
                        "distribution)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "uint8"], default=None,
                   help="stored latent dtype (default: bfloat16; pixels: uint8, their values as decoded)")
    p.add_argument("--vae-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="VAE weights. float32: bf16 autocast on a GPU, GroupNorm in float32; bfloat16: every "
                        "op in bf16, as diffusers' Flux pipelines run it (less memory traffic)")
    p.add_argument("--batch-size", type=int, default=32, help="images per VAE forward")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    # An H100 encodes about 500 images/s at 256 px; one worker decodes and resizes 100-200.
    p.add_argument("--decode-workers", type=int, default=min(8, _default_workers()),
                   help="DataLoader processes decoding and resizing images (one per core of this rank, "
                        "at most 8, by default)")
    p.add_argument("--allow-missing-captions", action="store_true",
                   help="keep images without an accepted caption (their original caption is still stored)")
    _add_selection_args(p, "images encoded, the others recorded as filtered_out (the images curate recaption left "
                           f"out are left out too): {_IMAGE_RULES}", "--fraction-seed")
    p.add_argument("--manifest-dir", default="manifests",
                   help="where long.json, short.json and mix.json go: a folder, or a URL when --out is one")
    p.add_argument("--name", default=None, help="prefix of the manifest names (NAME-long.json)")
    p.add_argument("--device", default=None, help="None: cuda:LOCAL_RANK if available, else cpu")
    _add_worker_args(p)

    p = sub.add_parser("score", help="CLIP image-text similarity per caption, an aesthetic score, and image "
                                     "classifiers' probabilities (NSFW, watermark), per image",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("images", help="an image stage folder written by `curate ingest`, or its URL")
    p.add_argument("--out", required=True, help="output folder, e.g. DATA/scores/clip, or a URL (s3://...: uploaded shard by shard)")
    p.add_argument("--captions", default=None,
                   help="a caption stage folder written by `curate recaption`: score its variants too (the "
                        "original captions, orig, are always scored)")
    p.add_argument("--model", default="clip-score", help="alias (clip-score: CLIP ViT-L/14), Hub id or local folder "
                                                         "of a CLIPModel; none: no CLIP, classifiers only")
    p.add_argument("--revision", default=None, help="pinned Hub revision of the model")
    p.add_argument("--aesthetic", default=None, metavar="FILE",
                   help="a LAION aesthetic predictor's state dict (sac+logos+ava1-l14-linearMSE.pth, on the image "
                        "embedding of CLIP ViT-L/14): adds an aesthetic column")
    p.add_argument("--classifier", action="append", default=[], metavar="MODEL:LABEL",
                   help="an image classifier (AutoModelForImageClassification, Hub id or folder) and the label whose "
                        "probability becomes a column; aliases nsfw (Falconsai/nsfw_image_detection) and watermark "
                        "(prithivMLmods/Watermark-Detection-SigLIP2); MODEL@REVISION pins a Hub commit, tag or "
                        "branch (nsfw@COMMIT); repeatable")
    p.add_argument("--embeddings", action="store_true",
                   help="store each image's CLIP image embedding too (image_embedding), for curate dedup")
    p.add_argument("--vqa", default=None, metavar="MODEL",
                   help="VQAScore of every caption (vqa_orig, vqa_long...): the probability this vision-language "
                        "model (alias such as qwen2.5-vl-3b, Hub id or folder; MODEL@REVISION pins a commit) answers "
                        "Yes to 'Does this figure show \"CAPTION\"?'; better not the captioner")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward")
    p.add_argument("--decode-workers", type=int, default=min(8, _default_workers()),
                   help="DataLoader processes decoding and preparing images (0: in this one)")
    p.add_argument("--device", default=None, help="None: cuda:LOCAL_RANK if available, else cpu")
    _add_worker_args(p)

    p = sub.add_parser("encode-text", help="text-encoder embeddings of every caption, and manifests that list them",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("latents", help="a latent stage folder written by `curate encode-latents`, or its URL")
    p.add_argument("--out", required=True, help="output folder, e.g. DATA/text/t5gemma, or a URL (s3://...: uploaded shard by shard)")
    p.add_argument("--text-encoder", default="t5gemma",
                   help="alias (t5gemma), Hub id or local folder: a T5Gemma checkpoint or a PRX pipeline")
    p.add_argument("--revision", default=None, help="pinned Hub revision of the text encoder")
    p.add_argument("--max-tokens", type=int, default=256,
                   help="tokens per caption, as training and PRXPipeline pad them: the run's max_tokens "
                        "(256 for the PRX presets, 64 for tiny)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="stored embeddings (a GPU encoder's output is bf16)")
    p.add_argument("--batch-size", type=int, default=64, help="captions per encoder forward")
    p.add_argument("--workers", type=int, default=None,
                   help="processes reading and cleaning captions ahead of the encoder (0: in this one; "
                        "default: 0 on a CPU, where the encoder takes every core, else 4)")
    p.add_argument("--manifests", nargs="+", default=None,
                   help="the manifests to extend, files or URLs (default: those encode-latents wrote for "
                        "these latents)")
    p.add_argument("--manifest-dir", default=None,
                   help="where the new manifests go, a folder or a URL (default: beside each input; a local one "
                        "for a manifest at a URL when --out is local)")
    p.add_argument("--name", default=None,
                   help="suffix of the new manifests' names, NAME in long-NAME.json (default: the --out folder's name)")
    p.add_argument("--device", default=None, help="None: cuda:LOCAL_RANK if available, else cpu")
    _add_worker_args(p)

    p = sub.add_parser("manifest", help="another caption selection of the same shards, a subset of the samples, or "
                                        "several datasets merged",
                       description="Write a manifest of the same shards (and text shards) with other caption "
                                   "weights, e.g. DALL-E 3's recipe, 95% synthetic and 5% original captions: "
                                   "curate manifest manifests/long.json --captions long=0.95,orig=0.05 --name dalle3. "
                                   "Given several manifests, merge them into one that trains on all their datasets, "
                                   "each keeping its caption selection and image stage, a dataset's shards repeated "
                                   "REPEAT times an epoch: curate manifest cc12m=manifests/cc12m-long.json "
                                   "curated=manifests/curated-long.json:4 --name mixed. "
                                   "With --where, --keep, --exclude or --fraction, train on a subset of the samples "
                                   "without writing shards again: curate manifest manifests/long.json --scores "
                                   "aesthetic.parquet --where 'aesthetic >= 5.5' --name aesthetic")
    p.add_argument("manifests", nargs="+", metavar="[NAME=]MANIFEST[:REPEAT]",
                   help="a manifest written by encode-latents, encode-text or curate manifest; several (or a REPEAT) "
                        "merge them, each a part named NAME (default: its manifest's name)")
    p.add_argument("--captions", default=None, metavar="VARIANT=WEIGHT,...",
                   help="caption variants (long, short, orig: the original captions, ...) and their weights, "
                        "normalised to sum to 1; when merging, for every part (default: each keeps its own)")
    held = p.add_mutually_exclusive_group()
    held.add_argument("--hold-out", type=int, default=None, metavar="SHARDS",
                      help="leave SHARDS shards, drawn at random, out of the new manifest and write them as "
                           "NAME-heldout.json beside it: held-out samples for train's val.shards")
    held.add_argument("--hold-out-samples", type=int, default=None, metavar="N",
                      help="the same with N samples drawn at random from every shard (a subset of each)")
    _add_selection_args(p, "the columns of the latent index (orig_w, orig_h, bucket_h, bucket_w, captions), the "
                           "image stage (width, height, bytes, format, source, caption), the caption stage "
                           "(long_words, short_words...) and --scores")
    p.add_argument("--unique", action="store_true",
                   help="when merging: a sample whose content is in several parts stays in the first one only")
    p.add_argument("--latent-scaling", type=float, default=None, metavar="S",
                   help="the denoiser's inputs are (latent - shift) * S instead of the VAE config's scaling "
                        "(`curate stats MANIFEST --latents N` measures the one that gives std 1)")
    p.add_argument("--latent-shift", type=float, default=None, metavar="H",
                   help="... and the shift H (the latents' mean for mean 0)")
    p.add_argument("--name", required=True, help="the new manifest's name")
    p.add_argument("--out", default=None, help="where to write it, a file or a URL (default: NAME.json beside the "
                                               "first manifest)")

    p = sub.add_parser("dedup", help="semantic near-duplicates among the images of a `curate score --embeddings` "
                                     "stage (SemDeDup): a table of the images to leave out with --exclude",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("scores", help="a score stage folder written with --embeddings, e.g. DATA/scores/clip")
    p.add_argument("--threshold", type=float, default=0.95,
                   help="cosine similarity of CLIP image embeddings from which an image is a duplicate of an earlier one")
    p.add_argument("--cluster-size", type=int, default=1000,
                   help="images per k-means cluster on average; only images of one cluster are compared")
    p.add_argument("--seed", type=int, default=0, help="seed of the k-means initialisation and fitting sample")
    p.add_argument("--prefer", default=None, metavar="EXPR",
                   help="which image of a group stays: the highest value of this SQL expression over the score "
                        "table's and the image stage's columns ('width * height', aesthetic); default: the first in "
                        "the dataset's order")
    p.add_argument("--against", default=None, metavar="EVAL",
                   help="decontaminate instead: list the images that are near-duplicates of an evaluation set's, "
                        "EVAL being a manifest (a held-out set; its embeddings are read from SCORES) or another "
                        "score stage with embeddings of the same model (a benchmark's images)")
    p.add_argument("--out", default=None, help="the table to write, a file or a URL (default: "
                                               "SCORES/duplicates-THRESHOLD.parquet, with --against "
                                               "SCORES/duplicates-of-EVAL-THRESHOLD.parquet)")
    p.add_argument("--device", default=None, help="None: cuda:LOCAL_RANK if available, else cpu")

    p = sub.add_parser("stats", help="totals and rejection reasons of a stage output, or what a manifest holds")
    p.add_argument("stage_dir", help="a stage folder (DATA/images), or a manifest (manifests/long.json): its "
                                     "samples per bucket, caption weights and coverage, text section, provenance")
    p.add_argument("--json", action="store_true", help="print the raw statistics as JSON")
    p.add_argument("--latents", type=int, default=0, metavar="N",
                   help="manifests: the mean and std of N samples' latents as the denoiser is fed them (drawn "
                        "as training draws them, in model space), and the scaling that would make them 0 and 1")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="caption stages: write a histogram of caption lengths per variant")
    return parser


def _run(stage, args: argparse.Namespace, share) -> int:
    """This worker's share of a stage; the stage's statistics if this worker finished it."""
    from curate.runner import run_stage
    from curate.stats import format_stats

    result = run_stage(stage, args.out, share=share, progress=not args.no_progress)
    if result.complete:
        print(format_stats(result.summary, args.out))
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from curate.ingest import IngestStage, ingested_in_path_order
    from curate.runner import CurateError, resolve_share
    from curate.sources import FolderSource, open_source

    share = resolve_share(args.rank, args.world_size)
    source = open_source(
        args.src, kind=args.source_type, url_column=args.url_column, caption_column=args.caption_column,
        image_column=args.image_column, split=args.split, download_threads=args.download_threads,
        download_timeout=args.download_timeout, download_retries=args.download_retries,
        order=args.order or "spread",
    )
    stage = IngestStage(source, args.out, shard_size=args.shard_size, min_side=args.min_side,
                        max_pixels=args.max_pixels, workers=args.workers, near_duplicates=args.near_duplicates)
    if args.order is not None and not isinstance(source, FolderSource):
        raise CurateError(f"--order orders a folder's images; {args.src} is a {source.kind} source, whose shards "
                          "follow its own order")
    if args.order is None and ingested_in_path_order(stage):
        source.order = "path"
        print(f"curate: {args.out} was ingested in path order (before the spread order existed): continuing it "
              "so; --order spread redoes it with every subfolder spread over the shards", file=sys.stderr)
    return _run(stage, args, share)


def cmd_recaption(args: argparse.Namespace) -> int:
    from curate.captioners import CaptionerError, Sampling, choose_backend, open_captioner
    from curate.models import resolve_model
    from curate.prompts import load_prompts
    from curate.recaption import CaptionSettings, RecaptionStage
    from curate.runner import CurateError, resolve_share

    share = resolve_share(args.rank, args.world_size)
    # --endpoint names a server: with --backend auto that is the openai backend.
    backend = "openai" if args.endpoint and args.backend == "auto" else choose_backend(args.backend)
    if args.endpoint and backend != "openai":  # a server was meant, and the model would run here instead
        raise CurateError(f"--endpoint is the openai backend's server; the {backend} backend runs the model here: "
                          "add --backend openai, or drop --endpoint")
    # A served model's name is whatever the server calls it; elsewhere resolve aliases and folders.
    model = args.model if backend == "openai" and not _is_alias(args.model) else resolve_model(args.model, "vlm").id
    try:
        prompts = load_prompts(args.prompts, args.variants)  # None: long and short
    except ValueError as e:
        raise CurateError(str(e)) from e
    settings = CaptionSettings(
        prompts=prompts,
        sampling=Sampling(temperature=args.temperature, top_p=args.top_p, seed=args.seed),
        max_pixels=args.max_pixels, retries=args.retries, use_orig_caption=args.use_orig_caption,
    )
    # Images per generate call: a few batches (transformers), many concurrent requests so that slow
    # ones do not idle the rest (openai), a large offline batch for vLLM's scheduler.
    chunk = {"openai": 4 * args.concurrency, "vllm": 256}.get(backend, 2 * args.batch_size)

    def load():
        try:
            return open_captioner(backend, model, revision=args.revision, endpoint=args.endpoint,
                                  batch_size=args.batch_size, concurrency=args.concurrency,
                                  max_pixels=args.max_pixels, api_key_env=args.api_key_env)
        except CaptionerError as e:
            raise CurateError(str(e)) from e

    stage = RecaptionStage(args.images, model, load, settings, revision=args.revision, chunk_images=chunk,
                           decode_workers=args.decode_workers, select=_selection(args))
    return _run(stage, args, share)


def cmd_encode_latents(args: argparse.Namespace) -> int:
    from curate.encode_latents import EncodeLatentsStage
    from curate.runner import resolve_share

    share = resolve_share(args.rank, args.world_size)
    stage = EncodeLatentsStage(
        args.images, args.captions, args.out, args.vae, revision=args.revision, vae_class=args.vae_class,
        resolution=args.resolution, buckets=args.buckets, bucket_multiple=args.bucket_multiple, store=args.store,
        dtype=args.dtype, vae_dtype=args.vae_dtype, batch_size=args.batch_size, compile=args.compile,
        decode_workers=args.decode_workers, allow_missing_captions=args.allow_missing_captions,
        select=_selection(args),
        manifest_dir=args.manifest_dir, name=args.name, device=args.device,
    )
    return _run(stage, args, share)


def cmd_score(args: argparse.Namespace) -> int:
    from curate.runner import resolve_share
    from curate.score import ScoreStage

    share = resolve_share(args.rank, args.world_size)
    stage = ScoreStage(args.images, model=args.model, revision=args.revision, captions_dir=args.captions,
                       aesthetic=args.aesthetic, classifiers=args.classifier, embeddings=args.embeddings, vqa=args.vqa,
                       batch_size=args.batch_size, decode_workers=args.decode_workers, device=args.device)
    return _run(stage, args, share)


def cmd_encode_text(args: argparse.Namespace) -> int:
    from curate.encode_text import EncodeTextStage
    from curate.runner import resolve_share

    share = resolve_share(args.rank, args.world_size)
    stage = EncodeTextStage(
        args.latents, args.out, args.text_encoder, revision=args.revision, max_tokens=args.max_tokens,
        dtype=args.dtype, batch_size=args.batch_size, workers=args.workers, manifests=args.manifests,
        manifest_dir=args.manifest_dir, name=args.name, device=args.device,
    )
    return _run(stage, args, share)


def _is_alias(name: str) -> bool:
    from curate.models import VLMS

    return name in VLMS


def cmd_manifest(args: argparse.Namespace) -> int:
    from curate import storage
    from curate.manifest import (
        ManifestError,
        hold_out,
        latent_index_rows,
        load_manifest,
        merge_manifests,
        overlapping_samples,
        parse_caption_weights,
        parse_merge_source,
        part_captions,
        part_coverage,
        with_captions,
        with_latent_scaling,
        write_manifest,
    )
    from curate.runner import CurateError
    from curate.subset import hold_out_samples, subset_manifest

    try:
        sources = [parse_merge_source(text) for text in args.manifests]
        merging = len(sources) > 1 or sources[0][0] is not None or sources[0][2] > 1
        rules = _selection(args)
        holding = args.hold_out is not None or args.hold_out_samples is not None
        if merging and holding:
            raise CurateError("--hold-out splits one manifest: hold shards out of each dataset's manifest, "
                              "then merge the rest")
        rescaling = args.latent_scaling is not None or args.latent_shift is not None
        if not merging and args.captions is None and not holding and not rules and not rescaling:
            raise CurateError("give --captions for another caption selection, --where, --keep, --exclude or "
                              "--fraction for a subset of the samples, --hold-out to split off held-out shards, "
                              "--latent-scaling/--latent-shift for another input scale, or several manifests "
                              "to merge")
        # Beside the (first) source, or --out: a local file or a URL (its shards named relative to it
        # within one bucket or host, by their URLs elsewhere).
        out = storage.as_location(args.out) if args.out else storage.sibling(sources[0][1], f"{args.name}.json")
        held_out_path = storage.sibling(out, f"{args.name}-heldout.json")
        for target in (out, held_out_path) if holding else (out,):
            if any(storage.resolved(target) == storage.resolved(path) for _, path, _ in sources):
                raise CurateError(f"{target} is a source manifest: choose another --name or --out")
        weights = parse_caption_weights(args.captions) if args.captions is not None else None
        held = report = None
        if isinstance(out, Path):  # the new manifest's relative paths resolve against its folder ("..")
            out.parent.mkdir(parents=True, exist_ok=True)
        if merging:
            manifest = merge_manifests(sources, name=args.name, out=out, captions=weights)
            if rules:
                manifest, report = subset_manifest(manifest, out, rules)
        else:
            source = load_manifest(sources[0][1], check_files=True)  # not a new manifest of missing shards
            if rules:
                source, report = subset_manifest(source, sources[0][1], rules)
            if args.hold_out is not None:
                manifest, held = hold_out(source, sources[0][1], args.hold_out, name=args.name, out=out,
                                          captions=weights)
            elif args.hold_out_samples is not None:
                rest, held = hold_out_samples(source, sources[0][1], args.hold_out_samples)
                manifest = with_captions(rest, sources[0][1], weights, name=args.name, out=out)
                held = with_captions(held, sources[0][1], weights, name=f"{args.name}-heldout", out=held_out_path)
            else:
                manifest = with_captions(source, sources[0][1], weights, name=args.name, out=out)
        if rescaling:
            manifest = with_latent_scaling(manifest, args.latent_scaling, args.latent_shift)
            if held is not None:  # the held-out samples are fed as the training ones
                held = with_latent_scaling(held, args.latent_scaling, args.latent_shift)
        rows = latent_index_rows(manifest, out, ["key", "captions"])  # read once: coverage and overlap
        coverage = part_coverage(manifest, rows)
        parts = manifest.parts or [None]
        for part, selection, counted in zip(parts, part_captions(manifest), coverage, strict=True):
            lacking = [v for v in selection if counted is not None and counted.get(v, 0) == 0]  # None: not counted
            if lacking:
                known = ", ".join(f"{v} ({n})" for v, n in (counted or {}).items() if n)
                of = f"part {part.name!r} ({part.provenance['manifest']['path']})" if part else ", ".join(args.manifests)
                raise CurateError(f"no sample of {of} has a {', '.join(lacking)} caption (samples per "
                                  f"variant: {known or 'none counted'})")
        overlap = overlapping_samples(manifest, rows) if merging else None
        written = write_manifest(manifest, out)
        if held is not None:
            write_manifest(held, held_out_path)
    except ManifestError as e:
        raise CurateError(str(e)) from None
    print(f"wrote {written}: {manifest.samples} samples in {len(manifest.shards)} shards"
          + (" an epoch" if merging else ""))
    if rescaling:
        print(f"  latents: (latent - {manifest.latent.shift_factor:g}) * {manifest.latent.scaling_factor:g} "
              f"(the VAE's own: shift {manifest.latent.vae_scaling[1]:g}, scaling {manifest.latent.vae_scaling[0]:g})")
    if report is not None:
        print(f"  subset: kept {report.kept} of {report.of} samples ({100 * report.kept / max(report.of, 1):.1f}%)")
        for rule, dropped, nulls in report.rules:
            print(f"    {rule}: drops {dropped}" + (f" ({nulls} with no value for it)" if nulls else ""))
    if held is not None:
        print(f"wrote {held_out_path}: {held.samples} held-out samples in {len(held.shards)} "
              f"shard{'s' if len(held.shards) != 1 else ''} "
              f"(train ... val.shards={held_out_path})")
    _print_selection(manifest, coverage)
    if overlap:
        print(f"  note: {overlap} samples (the same image content) are in more than one part "
              "(--unique keeps each in its first part only)")
    return 0


def _print_selection(manifest: Manifest, coverage: list[dict[str, int | None] | None]) -> None:
    """Each part's share of an epoch (a merged manifest), and how many of its samples have each
    selected caption variant."""
    from curate.manifest import part_captions, part_share

    parts = manifest.parts or [None]
    for part, selection, counted in zip(parts, part_captions(manifest), coverage, strict=True):
        samples = part.samples if part else manifest.samples
        if part is not None:
            print(f"  part {part.name}: {part_share(part, manifest.samples)}")
        for variant, weight in selection.items():
            have = (counted or {}).get(variant)
            share = f"{have} of {samples} samples have it" if have is not None else "not counted"
            fallback = "; the others fall back to another variant" if have is not None and have < samples else ""
            print(f"  {'  ' if part else ''}{variant}: weight {weight:.4g}, {share}{fallback}")


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def cmd_dedup(args: argparse.Namespace) -> int:
    from curate.dedup import decontaminate, dedup_scores
    from curate.runner import CurateError

    if args.out is not None and not str(args.out).lower().endswith(".parquet"):
        raise CurateError(f"--out {args.out}: the table is written as parquet: name it NAME.parquet (--exclude "
                          "reads a file by its suffix)")
    if args.against is not None:
        if args.prefer is not None:
            raise CurateError("--prefer chooses which image of a group stays; with --against every image near an "
                              "evaluation image is listed, so it does not apply")
        summary = decontaminate(args.scores, args.against, args.threshold, cluster_size=args.cluster_size,
                                seed=args.seed, device=args.device, out=args.out)
        of_what = f"one of the {summary['reference']} images of {summary['against']} ("
    else:
        summary = dedup_scores(args.scores, args.threshold, cluster_size=args.cluster_size, seed=args.seed,
                               prefer=args.prefer, device=args.device, out=args.out)
        of_what = f"one kept before them (in {summary['order']}, "
    print(f"{summary['duplicates']} of {summary['images']} images are near-duplicates of {of_what}cosine >= "
          f"{summary['threshold']:g}, {_plural(summary['clusters'], 'cluster')}): {summary['out']}")
    print(f"leave them out with --exclude {summary['out']} (curate recaption, encode-latents or manifest)")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from curate.runner import CurateError
    from curate.stats import (
        format_manifest_stats,
        format_stats,
        latent_stats,
        manifest_stats,
        stage_stats,
    )
    from curate.storage import is_remote

    if args.stage_dir.endswith(".json") and (is_remote(args.stage_dir) or Path(args.stage_dir).is_file()):
        stats = manifest_stats(args.stage_dir)
        if args.latents:
            stats["latents"] = latent_stats(args.stage_dir, args.latents)
        print(json.dumps(stats, indent=2) if args.json else format_manifest_stats(stats))
        return 0
    if args.latents:
        raise CurateError(f"{args.stage_dir}: --latents measures a manifest's latents; name a manifest (.json)")

    stats = stage_stats(args.stage_dir)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats, args.stage_dir))
    if args.plot:
        from curate.recaption import plot_caption_lengths

        print(f"wrote {plot_caption_lengths(args.stage_dir, args.plot)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    least_values = {"workers": 0 if args.command == "encode-text" else 1,  # 0: in-process
                    "shard_size": 1, "min_side": 1, "max_pixels": 1, "batch_size": 1, "concurrency": 1,
                    "resolution": 1, "decode_workers": 0, "retries": 0, "bucket_multiple": 1,
                    "download_threads": 1, "download_timeout": 1, "download_retries": 0}
    for name, least in least_values.items():
        value = getattr(args, name, None)
        if isinstance(value, int) and value < least:
            parser.error(f"--{name.replace('_', '-')} must be at least {least}")
    name = getattr(args, "name", None)
    if name is not None and (not name.strip() or "/" in name or name in (".", "..")):
        parser.error(f"--name {name!r}: a name that begins file names, without /")
    near = getattr(args, "near_duplicates", None)
    if near is not None:
        from curate.ingest import MAX_NEAR_DUPLICATE_BITS

        if not 0 <= near <= MAX_NEAR_DUPLICATE_BITS:
            parser.error(f"--near-duplicates must be 0 to {MAX_NEAR_DUPLICATE_BITS} bits, got {near}")
    from curate.manifest import ManifestError
    from curate.runner import CurateError
    from curate.shards import ShardError
    from curate.storage import PATH_ERRORS, RemoteError

    try:
        commands = {"ingest": cmd_ingest, "recaption": cmd_recaption, "encode-latents": cmd_encode_latents,
                    "encode-text": cmd_encode_text, "score": cmd_score, "manifest": cmd_manifest,
                    "dedup": cmd_dedup, "stats": cmd_stats}
        return commands[args.command](args)
    except (CurateError, ManifestError, ShardError, RemoteError, *PATH_ERRORS) as e:  # RemoteError: a store, after the retries
        print(f"curate: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
