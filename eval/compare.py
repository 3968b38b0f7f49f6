"""``evaluate compare RUN ...``: runs side by side, with the config keys in which they differ.

One row per run: the last step logged, its loss (the logged window's mean), the FID at the
latest evaluated step (of the evaluations at that step, the one with the most samples, then the
newest), and one column per
config key that is not the same in every run, which for a set of ablations of one baseline is
the ablation itself. FIDs are comparable only when they were measured the same way; when the
runs' evaluations differ in any setting but the step (sample count, seed, sampler, caption
choice, real images, Inception), the table says which.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from eval.fid import FEW_SAMPLES, result_files
from train.config import flatten, load_run_config, to_dict
from train.metrics import read_metrics

__all__ = ["compare_runs", "format_table"]

# Settings of an evaluation that must agree for FIDs to be compared (the step may differ).
_COMPARABLE = ("samples", "seed", "steps", "guidance", "captions", "resolution", "keys", "inception_sha1")
# Config keys that name a run rather than describe it.
_NOT_COMPARED = ("out",)


def _best_fid(run: Path) -> dict[str, Any] | None:
    results = [json.loads(p.read_text()) for p in result_files(run)]
    if not results:
        return None
    return max(results, key=lambda r: (r["step"], r["settings"]["samples"], r.get("finished", 0)))


def compare_runs(runs: list[str | os.PathLike[str]]) -> tuple[list[str], list[list[Any]], list[str]]:
    """(header, rows, notes) for ``runs``; see the module note."""
    if not runs:
        raise ValueError("no runs to compare")
    configs, rows, fids = [], [], []
    for run in map(Path, runs):
        cfg = load_run_config(run)
        if cfg is None:
            raise FileNotFoundError(f"{run} is not a run folder (no config.yaml)")
        configs.append({k: v for k, v in flatten(to_dict(cfg)).items() if k not in _NOT_COMPARED})
        logged = [m for m in read_metrics(run) if "loss" in m]
        fid = _best_fid(run)
        fids.append(fid)
        rows.append([run.name, logged[-1]["step"] if logged else None,
                     round(logged[-1]["loss"], 4) if logged else None,
                     round(fid["value"], 2) if fid else None, fid["step"] if fid else None,
                     fid["settings"]["samples"] if fid else None])
    keys = sorted(set().union(*configs))
    differing = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]
    header = ["run", "step", "loss", "FID", "FID step", "FID samples", *differing]
    rows = [row + [c.get(k) for k in differing] for row, c in zip(rows, configs, strict=True)]

    notes = []
    measured = [f for f in fids if f is not None]
    for setting in _COMPARABLE:
        if len({json.dumps(f["settings"].get(setting), sort_keys=True) for f in measured}) > 1:
            notes.append(f"the FIDs were measured with different {setting}: they are not comparable")
    if any(f.get("note") for f in measured):
        notes.append(f"some FIDs come from fewer than {FEW_SAMPLES} images: compare them only at equal sample counts")
    return header, rows, notes


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def format_table(header: list[str], rows: list[list[Any]], notes: list[str], fmt: str = "markdown") -> str:
    """``markdown`` (a table, then the notes), ``csv`` or ``json`` (a list of row objects)."""
    if fmt == "json":
        return json.dumps({"rows": [dict(zip(header, r, strict=True)) for r in rows], "notes": notes}, indent=1)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        writer.writerows([[_cell(v) for v in r] for r in rows])
        return out.getvalue().rstrip("\n")
    if fmt != "markdown":
        raise ValueError(f"unknown format {fmt!r}: markdown, csv or json")
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_cell(v).replace("|", "\\|") for v in r) + " |" for r in rows]
    return "\n".join(lines + [f"\nnote: {n}" for n in notes])
