"""The ``evaluate`` command: a run's FID, CMMD, DINO-MMD (and KID, CLIP score, VQAScore), runs side by side, FID's weights.

    evaluate run runs/NAME [--metrics fid,kid,cmmd,dino-mmd,fd-dinov2,clip-score,vqa-score] [--step N] ...
    torchrun --nproc_per_node 8 -m eval run runs/NAME ...
    evaluate pipeline exported/baseline|prx-256 --manifest manifests/long.json --out evals/prx-256
    evaluate compare runs/baseline runs/flux2 runs/short evals/prx-256 [--format markdown|csv|json]
    evaluate get-inception [--to FILE]
"""

from __future__ import annotations

import argparse
import sys

from curate.manifest import ManifestError
from curate.runner import CurateError
from curate.shards import ShardError
from curate.storage import PATH_ERRORS, RemoteError
from eval.evaluation import DEFAULT_METRICS, METRICS
from train.checkpoint import CheckpointError
from train.config import ConfigError

USER_ERRORS = (CurateError, ManifestError, CheckpointError, ConfigError, ShardError, *PATH_ERRORS, RemoteError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evaluate", description="Evaluate and compare training runs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="FID, CMMD and DINO-MMD of a run's checkpoint against its training images "
                                   "(and the CLIP score of its images against their prompts)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", help="the run folder (train --out), or its URL")
    p.add_argument("--step", default=None, help="the checkpoint's step, several (5000,10000) or all (every "
                                                "checkpoint the run kept, oldest first); default: the latest")
    p.add_argument("--manifest", default=None, help="the manifest whose samples and captions are used "
                                                    "(default: the one the run trained on)")
    p.add_argument("--weights", choices=["ema", "raw"], default=None,
                   help="the run's EMA weights (the default when it kept them) or the trained ones")
    _measuring(p, "the run's sample.steps", "the run's sample.guidance",
               "the run's sample.guidance_interval (0,1: every step)")

    p = sub.add_parser("pipeline", help="the same metrics of a PRXPipeline: a `train export` folder, another "
                                        "PRXPipeline folder, or Photoroom's releases (prx-256...) by Hub id or alias",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("pipeline", help="a pipeline folder, a Hub id or an alias (prx-256, prx-512, prx-512-sft, "
                                    "prx-1024-beta, prx-512-dc-ae, prx-512-dc-ae-sft)")
    p.add_argument("--out", required=True, help="where the evaluations go (OUT/eval); `evaluate compare` lists OUT "
                                                "beside runs")
    p.add_argument("--manifest", default=None, help="the manifest whose samples, captions and real images are "
                                                    "used (or --prompts)")
    p.add_argument("--revision", default=None, help="the Hub revision of a pipeline there")
    p.add_argument("--resolution", type=int, default=None,
                   help="image side (default: an export's, else the pipeline's default_sample_size)")
    p.add_argument("--shift", type=float, default=None, help="the sampler's time shift (default: its scheduler's)")
    _measuring(p, "28, as PRXPipeline", "4.0, as PRXPipeline", "0,1: every step")

    p = sub.add_parser("compare", help="runs side by side: loss, FID and the config keys that differ")
    p.add_argument("runs", nargs="+", help="run folders or URLs (and `evaluate pipeline --out` folders)")
    p.add_argument("--format", choices=("markdown", "csv", "json"), default="markdown")
    layout = p.add_mutually_exclusive_group()
    layout.add_argument("--by-step", action="store_true",
                        help="one row per evaluated checkpoint of each run: metrics against training steps")
    layout.add_argument("--every", action="store_true",
                        help="one row per stored evaluation: sweeps of guidance or sampler steps side by side")

    p = sub.add_parser("get-inception", help="download the FID Inception weights with pip (no dependencies)")
    p.add_argument("--to", default=None, help="where to keep the file (default: inside this environment)")
    return parser


def _measuring(p: argparse.ArgumentParser, steps: str, guidance: str, interval: str) -> None:
    """What every evaluation takes: the metrics and their networks, the samples, the sampler, scaling out."""
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                   help=f"comma-separated, from {', '.join(METRICS)} (kid: unbiased at any sample count, from "
                        "FID's features; fd-dinov2: FID's distance on DINOv2's features; clip-score, vqa-score: how "
                        "well the images follow their prompts)")
    p.add_argument("--samples", type=int, default=10_000,
                   help="images generated and real images compared (all samples if the data has fewer)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="a benchmark's prompts (one a line, or a .json list) instead of the manifest's samples: the "
                        "first --samples of them, scored without real images (--metrics clip-score,vqa-score)")
    p.add_argument("--images", default=None,
                   help="the image stage folder (default: the manifest's provenance); for a merged manifest, "
                        "NAME=DIR[,NAME=DIR] for the parts whose stage moved")
    p.add_argument("--captions", default=None, metavar="VARIANT",
                   help="prompt every sample with this caption variant (long, short, orig) instead of "
                        "the manifest's caption selection")
    p.add_argument("--steps", type=int, default=None, help=f"sampler steps (default: {steps})")
    p.add_argument("--guidance", type=_guidances, default=None,
                   help="classifier-free guidance scale, or several (1.5,3,4.5: one evaluation each, a sweep "
                        f"that `evaluate compare --every` lays out); default: {guidance}")
    p.add_argument("--guidance-interval", type=_interval, default=None, dest="guidance_interval", metavar="LOW,HIGH",
                   help="guide only at times t in [LOW, HIGH] (t = 1 is noise; the conditional model alone "
                        f"elsewhere); default: {interval}")
    p.add_argument("--seed", type=int, default=0, help="chooses the samples; image i's noise seed is seed + i")
    p.add_argument("--batch-size", type=int, default=16, help="images sampled per denoiser call")
    p.add_argument("--device", default=None, help="default: this worker's GPU when CUDA is available, else cpu")
    p.add_argument("--inception", default=None, help="FID's Inception weights file (default: see get-inception)")
    p.add_argument("--clip", default=None, help="CMMD's CLIP: alias, Hub id or folder (default: clip = "
                                                "openai/clip-vit-large-patch14-336)")
    p.add_argument("--dino", default=None, help="DINO-MMD's and FD-DINOv2's DINOv2: alias, Hub id or folder (default: dinov2 = "
                                                "facebook/dinov2-large)")
    p.add_argument("--clip-score", default=None, dest="clip_score",
                   help="the CLIP score's CLIP, both towers: alias, Hub id or folder (default: clip-score = "
                        "openai/clip-vit-large-patch14)")
    p.add_argument("--vqa-model", default=None, dest="vqa",
                   help="VQAScore's vision-language model: alias, Hub id or folder (default: qwen2.5-vl = "
                        "Qwen/Qwen2.5-VL-7B-Instruct; better not the model that wrote the captions)")
    p.add_argument("--force", action="store_true", help="generate the images again even if this evaluation is stored")
    g = p.add_argument_group("scaling out (defaults from torchrun's RANK/WORLD_SIZE or Slurm)")
    g.add_argument("--rank", type=int, default=None, help="this worker's index")
    g.add_argument("--world-size", type=int, default=None, help="number of workers")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    for name in ("samples", "steps", "batch_size", "resolution"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if getattr(args, "shift", None) is not None and args.shift <= 0:
        parser.error("--shift must be positive")
    if getattr(args, "seed", 0) < 0:  # numpy's generators, which choose the samples, take none
        parser.error("--seed must be at least 0")
    try:
        if args.command in ("run", "pipeline"):
            return _run(args)
        if args.command == "compare":
            from eval.compare import compare_runs, format_table

            print(format_table(*compare_runs(args.runs, by_step=args.by_step, every=args.every), fmt=args.format))
            return 0
        from eval.inception import fetch_inception

        print(fetch_inception(args.to))
        return 0
    except USER_ERRORS as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2


def _steps(run: str, step: str | None) -> list[int | None]:
    """--step as checkpoint steps: None (the latest), N, N,M,... or all (every kept checkpoint)."""
    from train.checkpoint import checkpoint_steps

    if step is None:
        return [None]
    if step == "all":
        found = checkpoint_steps(run)
        if not found:
            raise CheckpointError(f"{run} has no checkpoint")
        return found
    try:
        return [int(s) for s in step.split(",") if s.strip()]
    except ValueError:
        raise CurateError(f"--step takes a step, steps separated by commas, or all; got {step!r}") from None


def _interval(value: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"two times LOW,HIGH between 0 and 1, not {value!r}") from None
    return low, high


def _guidances(value: str) -> list[float]:
    try:
        scales = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        scales = []
    if not scales:
        raise argparse.ArgumentTypeError(f"a guidance scale or several separated by commas, not {value!r}")
    return scales


def _run(args: argparse.Namespace) -> int:
    """`evaluate run` (each --step) and `evaluate pipeline`, at each --guidance."""
    from curate.stats import rounded
    from eval.evaluation import evaluate_pipeline, evaluate_run

    common = dict(
        metrics=[m.strip() for m in args.metrics.split(",") if m.strip()], manifest=args.manifest, images=args.images,
        samples=args.samples, seed=args.seed, guidance_interval=args.guidance_interval, variant=args.captions,
        batch_size=args.batch_size, device=args.device, inception=args.inception, clip=args.clip, dino=args.dino,
        clip_score=args.clip_score, vqa=args.vqa, prompts=args.prompts, rank=args.rank, world_size=args.world_size,
        force=args.force, progress=not args.no_progress)
    if args.command == "pipeline":
        runs = [lambda guidance: evaluate_pipeline(
            args.pipeline, args.out, revision=args.revision, resolution=args.resolution, shift=args.shift,
            steps=28 if args.steps is None else args.steps, guidance=4.0 if guidance is None else guidance,
            **common)]
        where = args.out
    else:
        runs = [lambda guidance, step=step: evaluate_run(args.run, step=step, steps=args.steps, guidance=guidance,
                                                         weights=args.weights, **common)
                for step in _steps(args.run, args.step)]
        where = args.run
    for evaluate in runs:
        for guidance in args.guidance or [None]:
            result = evaluate(guidance)
            if result is None:
                print("this worker's chunks are done; the last worker to finish writes the result")
                continue
            settings = result["settings"]
            values = ", ".join(f"{m} {rounded(v['value'])}" + (f" ± {rounded(v['std'])}" if v.get("std") else "")
                               + (f" (real images {rounded(v['real'])})" if "real" in v else "")
                               for m, v in result["metrics"].items())
            print(f"{values} at step {result['step']} from {settings['samples']} images ({settings['steps']} steps, "
                  f"guidance {settings['guidance']}); {where}/eval/step{result['step']:08d}-{result['tag']}.json")
            if result.get("note"):
                print(f"note: {result['note']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
