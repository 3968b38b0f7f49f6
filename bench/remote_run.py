"""A run folder at a URL (`train --out http://...`, train/remote_run.py) against a local one,
measured in one run (CPU, 127.0.0.1).

The same training run (bench/train.py's widened tiny denoiser, 5.0M parameters: checkpoints of
60 MB with AdamW's moments) written three ways, ``--steps`` steps with a checkpoint every
``--every``:

- into a local folder (the reference);
- to a URL, each checkpoint uploaded in the background while the next steps run (the default);
- to a URL, each upload waited for before the next step (what a trainer that uploads in line
  would do), by making the trainer's pushes wait.

The URL is a real HTTP server on 127.0.0.1 in a process of its own (``tests/file_server.py``)
that takes at most ``--upload-rate`` MB/s per upload (a store's bandwidth to one machine; 0: as
fast as the loopback goes). Steps/s are the run's steps over its whole wall time, start-up
included (the same on each side), so that the time a step waits on a checkpoint counts. The last
checkpoint's upload is waited for in both URL modes: the run is not done before it is up. Modes
run interleaved, ``--repeats`` times; the table gives the median and every run.

    python bench/remote_run.py [--quick] [--repeats 3] [--steps 60] [--every 15] [--upload-rate 50]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]

from latent_data import make_latent_dataset  # noqa: E402

from curate.tiny import build_tiny_t5gemma  # noqa: E402
from train.checkpoint import latest_checkpoint  # noqa: E402
from train.remote_run import RemoteRun  # noqa: E402
from train.trainer import train  # noqa: E402

MODES = ("local", "url, in the background", "url, waited for")

# bench/train.py's model and settings (loaded by path: as "train" it would shadow the package).
_spec = importlib.util.spec_from_file_location("bench_train", Path(__file__).resolve().parent / "train.py")
bench_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_train)


@contextlib.contextmanager
def uploads_waited() -> Iterator[None]:
    """Every checkpoint's push waits for its upload, as an in-line upload would."""
    push = RemoteRun.push

    def waited(self: RemoteRun, checkpoint: Path | None = None, **kwargs: Any) -> None:
        push(self, checkpoint, **kwargs)
        if checkpoint is not None:
            self._collect(kwargs["note"], "", wait=True)

    RemoteRun.push = waited  # type: ignore[method-assign]
    try:
        yield
    finally:
        RemoteRun.push = push  # type: ignore[method-assign]


def timed(cfg_args: dict, out: str, waited: bool) -> float:
    """Steps/s of one whole run into ``out``, its notes kept off the terminal."""
    cfg = bench_train.config(**cfg_args, out=Path(out))
    cfg.out = out  # a URL as it is (a Path would fold its "//")
    captured = io.StringIO()
    started = time.perf_counter()
    try:
        with contextlib.redirect_stderr(captured), uploads_waited() if waited else contextlib.nullcontext():
            result = train(cfg)
    except BaseException:
        sys.stderr.write(captured.getvalue()[-3000:])
        raise
    return result.steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 12 steps, a checkpoint every 4, 1 repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=15, help="checkpoint_every")
    parser.add_argument("--upload-rate", type=float, default=50.0, help="MB/s an upload takes at most (0: no limit)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.every, args.repeats = 12, 4, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="kiln-bench-remote-run-") as tmp:
        root = Path(tmp)
        os.environ["KILN_STAGING"] = str(root / "staging")
        text = build_tiny_t5gemma(root / "t5gemma")
        data = make_latent_dataset(root / "latents", shards=4, per_shard=64, sizes=[(32, 32)])
        (root / "store").mkdir()
        server = subprocess.Popen([sys.executable, str(Path(__file__).parents[1] / "tests" / "file_server.py"),
                                   str(root / "store"), "--upload-rate", str(args.upload_rate * 1e6)],
                                  stdout=subprocess.PIPE, text=True)
        try:
            base = server.stdout.readline().split()[1]
            cfg_args = {"manifest": data["long"], "text": text, "steps": args.steps, "global_batch": 8,
                        "micro_batch": 8, "workers": 1, "every": args.steps,
                        "extra": {"checkpoint_every": args.every, "keep_checkpoints": 2}}
            rates: dict[str, list[float]] = {mode: [] for mode in MODES}
            for repeat in range(args.repeats):
                for i, mode in enumerate(MODES):
                    out = str(root / "runs" / f"{repeat}-{i}") if mode == "local" else f"{base}/runs/{repeat}-{i}"
                    rates[mode].append(timed(cfg_args, out, waited=mode == "url, waited for"))
            size = latest_checkpoint(root / "runs" / "0-0").stat().st_size
        finally:
            server.kill()
            server.wait()

    cores = os.cpu_count()
    print(f"\n## A run folder at a URL ({platform.processor() or platform.machine()}, {cores} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads)\n")
    print(f"{args.steps} steps of global batch 8, a checkpoint ({size / 1e6:.0f} MB) every {args.every} steps; "
          f"uploads at most {args.upload_rate:g} MB/s ({size / (args.upload_rate * 1e6):.2f} s a checkpoint)"
          if args.upload_rate else "uploads as fast as the loopback goes")
    print("\n| run folder | steps/s (median) | runs | vs local | seconds added to the run |\n|---|---|---|---|---|")
    reference = statistics.median(rates["local"])
    for mode in MODES:
        median = statistics.median(rates[mode])
        print(f"| {mode} | {median:.2f} | {', '.join(f'{r:.2f}' for r in rates[mode])} | {median / reference:.2f} "
              f"| {args.steps / median - args.steps / reference:.1f} |")


if __name__ == "__main__":
    main()
