"""Where metrics go: ``RUN/metrics.jsonl`` always, TensorBoard and wandb when asked, a progress bar.

Only rank 0 writes. JSONL is the record the tests and ``evaluate`` read; a resumed run
appends after dropping lines from steps it is about to redo, so the file reads like one
uninterrupted run.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from curate import storage

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        enabled: bool,
        start_step: int,
        total_steps: int,
        tensorboard: bool = True,
        wandb: bool = False,
        wandb_project: str = "kiln",
        config: dict[str, Any] | None = None,
        url: str | None = None,
    ):
        """``url``: where the run lives when ``run_dir`` is its local copy (train/remote_run.py):
        it names the wandb run, the same from any machine."""
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self.tb = self.wandb = self.bar = None
        # TensorBoard's writer is made at the first value it takes, so that a run that logs
        # nothing (a finished run resumed) leaves no empty events file; the first one made drops
        # the events a killed run logged after the step it resumes from.
        self._board_dir: str | None = None
        self._purge_step: int | None = start_step + 1
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_after(self.path, start_step)
        self.file = open(self.path, "a", buffering=1)  # noqa: SIM115 - closed in close()
        if tensorboard:
            try:
                import torch.utils.tensorboard  # noqa: F401 - whether it can be written

                self._board_dir = str(Path(run_dir) / "tensorboard")
            except ImportError:
                warnings.warn("tensorboard is not installed: metrics go to metrics.jsonl only",
                              stacklevel=2)
        if wandb:
            try:
                import wandb as wandb_module
            except ImportError:
                raise RuntimeError("log.wandb=true but wandb is not installed (pip install wandb)") from None
            self.wandb = wandb_module.init(project=wandb_project, dir=str(run_dir), config=config,
                                           name=Path(url or run_dir).name, resume="allow",
                                           id=_wandb_id(url or str(Path(run_dir).resolve())))
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not sys.stderr.isatty() and os.environ.get("KILN_PROGRESS") != "1")
        self.total_steps, self.start_step, self.started = total_steps, start_step, time.monotonic()

    def _board(self) -> Any:
        """TensorBoard's writer (made now if there is none), or None without TensorBoard."""
        if self.tb is None and self._board_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(self._board_dir, purge_step=self._purge_step)
            self._purge_step = None
        return self.tb

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: v for k, v in metrics.items() if v is not None}
        self.file.write(json.dumps({"step": step, **clean}) + "\n")
        if (board := self._board()) is not None:
            for key, value in clean.items():
                if isinstance(value, int | float):
                    board.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(clean, step=step)
        if self.bar is not None and not self.bar.disable:
            self.bar.set_postfix({k: f"{clean[k]:.4g}" for k in ("loss", "lr", "images_per_s") if k in clean},
                                 refresh=False)
        else:  # a batch job's log file: one plain line per metrics line instead of a bar
            done = step - self.start_step
            eta = (time.monotonic() - self.started) / done * (self.total_steps - step) if done > 0 else None
            line = _plain_line(step, self.total_steps, clean)
            print(f"{line}  ETA {_duration(eta)}" if eta is not None else line, file=sys.stderr, flush=True)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def note(self, message: str) -> None:
        """A line for the user (rank 0 only), printed above the progress bar."""
        if self.enabled:
            tqdm.write(message, file=sys.stderr)

    def add_image(self, tag: str, path: Path, step: int) -> None:
        if (board := self._board()) is not None:
            import numpy as np
            from PIL import Image

            board.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
        if self.wandb is not None:
            import wandb as wandb_module

            self.wandb.log({tag: wandb_module.Image(str(path))}, step=step)

    def flush(self, new_events_file: bool = False) -> None:
        """Everything logged so far on disk, before the run folder is copied; ``new_events_file``:
        TensorBoard's file closed, the next value to begin a new one, so that a copy need only send
        the new one."""
        if not self.enabled:
            return
        self.file.flush()
        if self.tb is not None:
            self.tb.flush()
            if new_events_file:
                self.tb.close()
                self.tb = None

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.file.close()


def _plain_line(step: int, total: int, m: dict[str, Any]) -> str:
    parts = [f"step {step}/{total}"]
    for key, label, fmt in (("loss", "loss", ".4f"), ("val_loss", "val loss", ".4f"), ("repa_loss", "repa", ".4f"),
                            ("lpips_loss", "lpips", ".4f"), ("pdino_loss", "p-dino", ".4f"), ("grad_norm", "grad", ".3g"),
                            ("lr", "lr", ".2e"), ("epoch", "epoch", ".2f"),
                            ("images_per_s", "img/s", ".1f"), ("data_wait_share", "data wait", ".1%"),
                            ("mfu", "MFU", ".1%"), ("peak_memory_gb", "mem GB", ".1f")):
        if key in m:
            parts.append(f"{label} {m[key]:{fmt}}")
    return "  ".join(parts)


def _duration(seconds: float) -> str:
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{sec:02d}"


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [record for _, record in _records(path)]


def _records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each line of a metrics file with its record; a line that is not JSON (cut off by a kill, or
    being written) is passed over."""
    for line in path.read_text().splitlines():
        try:
            yield line, json.loads(line)
        except json.JSONDecodeError:
            continue


def _truncate_after(path: Path, step: int) -> None:
    """Drop lines of steps > ``step``: logged after the checkpoint a resume starts from."""
    if not path.exists():
        return
    keep = [line for line, record in _records(path) if record.get("step", -1) <= step]
    with storage.replacing(path) as tmp:
        tmp.write_text("".join(f"{line}\n" for line in keep))


def _wandb_id(location: str) -> str:
    """A stable id per run folder (its resolved path or URL), so a resumed run continues the same wandb run."""
    import hashlib

    return hashlib.blake2b(location.encode(), digest_size=8).hexdigest()
