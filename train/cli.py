"""``train``: train a denoiser on a manifest, or export a run for diffusers.

    train --shards manifests/long.json --out runs/NAME [--preset tiny|small|prx-1.2b]
          [--ablation x-pred,muon,repa,irepa,tread,cfm,immiscible,ema] [--init-from RUN|CHECKPOINT|FOLDER|HUB_ID]
          [--config FILE.yaml] [--resume auto] [key=value ...]
    torchrun --nproc_per_node 8 -m train --shards ... --out ...
    train export runs/NAME --to DIR [--step N] [--weights ema|raw]
    train generate DIR "a prompt" ... --out image.png
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from curate import storage
from curate.manifest import ManifestError
from curate.runner import CurateError
from curate.shards import ShardError
from curate.storage import PATH_ERRORS, RemoteError
from train.checkpoint import CheckpointError
from train.config import ABLATIONS, PRESETS, ConfigError
from train.data import DataError

# What a user can fix (bad arguments, data or run folder): a message and exit status 2, no traceback.
USER_ERRORS = (ConfigError, ManifestError, CheckpointError, CurateError, DataError, ShardError, *PATH_ERRORS, RemoteError)


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train", description="Train a PRX denoiser on precomputed latents (rectified flow).",
        epilog="`train export RUN --to DIR` writes a folder that diffusers' PRXPipeline loads; "
               "`train generate DIR PROMPT --out FILE.png` samples from it.")
    p.add_argument("--shards", help="the manifest to train on (manifests/long.json)")
    p.add_argument("--out", help="the run folder: config, checkpoints, metrics, samples; or a URL "
                                 "(s3://bucket/runs/NAME: written in a local copy in $KILN_STAGING and uploaded)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="model size and schedule; default prx-1.2b")
    p.add_argument("--ablation", dest="ablations", action="append", type=_ablation_names, default=None,
                   metavar="NAME[,NAME]", help="PRX ablations applied on top of the preset: "
                   + "; ".join(f"{name}: {', '.join(f'{k}={v}' for k, v in keys.items())}"
                               for name, keys in ABLATIONS.items()))
    p.add_argument("--init-from", metavar="SOURCE",
                   help="start from trained weights (init.source): a run folder or URL (its latest "
                        "checkpoint), a checkpoint file or URL, a `train export` folder, a diffusers PRXTransformer2DModel "
                        "folder or Hub id, or an alias (prx-256, prx-512, prx-512-sft, prx-1024-beta, prx-512-dc-ae...); "
                        "optimizer, schedule and step start afresh")
    p.add_argument("--config", dest="config_file", help="a YAML file of config keys")
    p.add_argument("--resume", default="never",
                   help="auto: continue from the run folder's latest checkpoint, starting from its "
                        "saved config (key=value may change steps, intervals, logging); or one of the "
                        "run's checkpoints (RUN/checkpoints/step_N.pt: the later ones are deleted at the "
                        "next checkpoint); never (default) refuses a run folder that has checkpoints")
    p.add_argument("--check", action="store_true",
                   help="run every check of the first step (manifest, shards, text shards, resume or "
                        "init source, REPA's teacher and images, the sample grids' VAE) and exit without "
                        "training: before queueing a large job")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (every key, as YAML) and exit without training")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides: steps=1000 lr=3e-4 flow.shift=2 ...")
    return p


def _ablation_names(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown ablation {', '.join(unknown) or repr(value)}; choose from "
                                         f"{', '.join(ABLATIONS)}")
    return names


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train export",
                                description="Write a run's checkpoint as a diffusers PRXPipeline folder.")
    p.add_argument("run", help="the run folder, or a run's URL (train --out s3://...)")
    p.add_argument("--to", type=Path, required=True, help="the folder to write")
    p.add_argument("--step", type=int, default=None, help="the checkpoint's step (default: latest)")
    p.add_argument("--weights", choices=["ema", "raw"], default=None,
                   help="the EMA weights (the default when the run kept them) or the trained ones")
    return p


def _generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train generate",
                                description="Generate images from an exported folder with PRXPipeline.")
    p.add_argument("folder", type=Path, help="a folder written by `train export`")
    p.add_argument("prompts", nargs="+", help="one image per prompt")
    p.add_argument("--out", type=Path, required=True, help="PNG path; several prompts add -0, -1 ...")
    p.add_argument("--size", type=int, default=None, help="pixels per side (default: the training resolution)")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["export"]:
            return _export(_export_parser().parse_args(argv[1:]))
        if argv[:1] == ["generate"]:
            return _generate(_generate_parser().parse_args(argv[1:]))
        return _train(_train_parser().parse_intermixed_args(argv))  # key=value before and after options
    except USER_ERRORS as e:
        rank = os.environ.get("RANK")
        prefix = f"train (rank {rank})" if rank not in (None, "0") else "train"
        print(f"{prefix}: error: {e}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    from train.config import build_config, load_run_config
    from train.trainer import train

    if args.out:
        args.out = storage.local_path(args.out)  # file:///abs/run is the folder /abs/run
    # Resuming starts from the run's saved config: `train --out runs/NAME --resume auto` is enough.
    base = load_run_config(args.out) if args.out and args.resume != "never" else None
    cfg = build_config(args.preset, args.config_file, args.overrides, ablations=sum(args.ablations or [], []), base=base,
                       shards=args.shards, out=args.out, **{"init.source": args.init_from})
    if args.print_config:
        from train.config import to_yaml

        print(to_yaml(cfg), end="")
        return 0
    result = train(cfg, resume=args.resume, check_only=args.check)
    if int(os.environ.get("RANK", "0")) == 0:
        finished = "" if result.resumed_from is None or result.resumed_from < cfg.steps else "the run had finished: "
        print("\n".join(["train --check: every check before the first step passed", *result.notes]) if args.check
              else f"{finished}trained {result.steps} steps; last loss {result.last_loss}; run folder "
              + (cfg.out if storage.is_remote(cfg.out) else str(result.run_dir)))
    return 0


def _export(args: argparse.Namespace) -> int:
    from train.export import export_run

    out = export_run(args.run, args.to, step=args.step, weights=args.weights)
    print(f"exported to {out}: PRXPipeline.from_pretrained({str(out)!r})")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from PIL import Image

    from curate.runner import resolve_device
    from train.export import generate

    device = resolve_device(args.device)
    if args.out.is_dir() or args.out.suffix.lower() not in Image.registered_extensions():
        raise ConfigError(f"--out {args.out}: give an image file name (.png, .jpg, .webp ...)")
    images = generate(args.folder, args.prompts, height=args.size, width=args.size, steps=args.steps,
                      guidance=args.guidance, seed=args.seed, device=device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        path = args.out if len(images) == 1 else args.out.with_name(f"{args.out.stem}-{i}{args.out.suffix}")
        image.save(path)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
