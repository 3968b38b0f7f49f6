"""``evaluate compare RUN ...``: runs side by side, with the config keys in which they differ (and
the pipelines `evaluate pipeline` measured, named in a column of their own).

One row per run: the last step logged, its loss (the logged window's mean), its latest validation
loss (``val.shards``: a held-out set measured the same way each time; with ``by_step`` or ``every``,
the one logged at the evaluated step) when any run has one, the metrics of its
latest evaluation (latest step; at that step, the most samples, then the newest), and one column
per config key that is not the same in every run, which for a set of ablations of one baseline
is the ablation itself. ``by_step`` gives one row per evaluated step instead: metrics against
training steps, run by run; ``every`` one row per stored evaluation, with the sampler settings
that differ between them as columns (a guidance sweep). Metrics are comparable only when they were measured the same way; when
the runs' evaluations differ in any setting but the step (sample count, seed, sampler, caption
choice, prompts, real images) or in a metric's network, the table says which.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from curate import storage
from curate.stats import rounded
from eval.evaluation import FEW_SAMPLES, METRICS, RESULT_GLOB, read_json, result_files
from train.config import EVERY_STEP, flatten, load_run_config, to_dict
from train.metrics import METRICS_FILE, read_metrics
from train.remote_run import RemoteRun

__all__ = ["compare_runs", "format_table"]

# Settings of an evaluation that must agree for its metrics to be compared (the step may differ).
# The prompts' hash too: two prompt files of one length (benchmarks scored with --prompts) have no
# keys or caption choice to tell them apart.
_COMPARABLE = ("samples", "seed", "steps", "guidance", "guidance_interval", "captions", "prompts", "resolution",
               "keys")
# Config keys that name a run rather than describe it.
_NOT_COMPARED = ("out",)
_TITLES = {"fid": "FID", "kid": "KID", "cmmd": "CMMD", "dino-mmd": "DINO-MMD", "fd-dinov2": "FD-DINOv2",
           "clip-score": "CLIP score",
           "vqa-score": "VQAScore"}


def _evaluations_by_step(run: Path) -> dict[int, dict[str, Any]]:
    """A run's evaluations, one per checkpoint step: the one with the most samples, then the newest."""
    chosen: dict[int, dict[str, Any]] = {}
    for path in result_files(run):
        result = read_json(path)
        if result is None:  # deleted since it was listed
            continue
        rank = (result["settings"]["samples"], result.get("finished", 0))
        held = chosen.get(result["step"])
        if held is None or rank > (held["settings"]["samples"], held.get("finished", 0)):
            chosen[result["step"]] = result
    return dict(sorted(chosen.items()))


def _differ(values: list[Any]) -> bool:
    return len({json.dumps(v, sort_keys=True) for v in values}) > 1


# Sampler settings that --every shows as columns (a sweep) instead of noting them.
_SWEPT = {"guidance": "guidance", "guidance_interval": "guidance interval", "steps": "sampler steps"}
# Settings an evaluation records only when they are not these (so older evaluations keep their tags).
_UNRECORDED = {"guidance_interval": list(EVERY_STEP)}


def _all_evaluations(run: Path) -> list[dict[str, Any]]:
    """Every stored evaluation of a run, by step, then sampler settings, then samples."""
    results = [result for path in result_files(run) if (result := read_json(path)) is not None]
    return sorted(results, key=lambda r: (r["step"], *(json.dumps(_setting(r, s)) for s in _SWEPT),
                                          r["settings"]["samples"], r.get("finished", 0)))


def compare_runs(
    runs: list[str | os.PathLike[str]], *, by_step: bool = False, every: bool = False
) -> tuple[list[str], list[list[Any]], list[str]]:
    """(header, rows, notes) for ``runs``; see the module note. ``by_step``: one row per
    evaluated checkpoint of each run instead of the latest one only (metrics against steps);
    ``every``: one row per stored evaluation, the differing sampler settings as columns."""
    if by_step and every:
        raise ValueError("by_step and every are two layouts: choose one")
    if not runs:
        raise ValueError("no runs to compare")
    configs, pipelines, logs, held_out, evaluations = [], [], [], [], []
    for name, run in zip(runs, map(_readable, runs), strict=True):
        cfg = load_run_config(run)
        pipeline = _pipeline_of(run) if cfg is None else None
        if cfg is None and pipeline is None:
            raise FileNotFoundError(f"{name} is neither a run folder (no config.yaml) nor a folder of `evaluate "
                                    "pipeline` evaluations")
        # A pipeline has no config: its row names the pipeline, the runs' keys are left empty.
        configs.append(None if cfg is None else
                       {k: v for k, v in flatten(to_dict(cfg)).items() if k not in _NOT_COMPARED})
        pipelines.append(pipeline)
        metrics_lines = read_metrics(run)
        logs.append([m for m in metrics_lines if "loss" in m])
        held_out.append([m for m in metrics_lines if "val_loss" in m])  # train's val.shards
        by = list(_evaluations_by_step(run).values())
        evaluations.append(_all_evaluations(run) if every else by if by_step else by[-1:])
    measured = [e for run_evaluations in evaluations for e in run_evaluations]
    metrics = [m for m in METRICS if any(m in e["metrics"] for e in measured)]
    trained = [c for c in configs if c is not None]
    keys = sorted(set().union(*trained))
    differing = [k for k in keys if _differ([c.get(k) for c in trained])]
    named = any(pipelines)
    swept = [s for s in _SWEPT if every and _differ([_setting(e, s) for e in measured])]
    validated = any(held_out)
    header = ["run", "step", "loss", *(["val loss"] if validated else []), *[_TITLES[m] for m in metrics],
              "eval step", "eval samples",
              *[_SWEPT[s] for s in swept], *(["pipeline"] if named else []), *differing]
    rows = []
    for run, logged, val, run_evaluations, config, pipeline in zip(runs, logs, held_out, evaluations, configs,
                                                                    pipelines, strict=True):
        for evaluation in run_evaluations or [None]:
            values = [rounded(evaluation["metrics"][m]["value"]) if evaluation and m in evaluation["metrics"]
                      else None for m in metrics]
            rows.append([Path(run).name, logged[-1]["step"] if logged else None,
                         round(logged[-1]["loss"], 4) if logged else None,
                         *([_val_loss(val, evaluation["step"] if evaluation and (by_step or every) else None)]
                           if validated else []), *values,
                         evaluation["step"] if evaluation else None,
                         evaluation["settings"]["samples"] if evaluation else None,
                         *[_setting(evaluation, s) if evaluation else None for s in swept],
                         *([pipeline] if named else []),
                         *[config.get(k) if config is not None else None for k in differing]])

    notes = [f"the evaluations differ in {setting}: their metrics are not comparable"
             for setting in _COMPARABLE
             if setting not in swept and _differ([_setting(e, setting) for e in measured])]
    if validated and any(_differ([c.get(k) for c in trained]) for k in ("val.shards", "val.samples", "val.timesteps")):
        notes.append("the runs measured their val loss on different held-out sets (val.shards, val.samples, "
                     "val.timesteps): not comparable")
    for m in metrics:
        if _differ([e["metrics"][m]["network"] for e in measured if m in e["metrics"]]):
            notes.append(f"{_TITLES[m]} was measured with different networks: not comparable")
    if "fid" in metrics and any(e["settings"]["samples"] < FEW_SAMPLES for e in measured):
        notes.append(f"FID from fewer than {FEW_SAMPLES} images is biased: compare it only at equal sample counts")
    return header, rows, notes


def _readable(run: str | os.PathLike[str]) -> Path:
    """The run folder, or for a run at a URL a local copy of what is compared: its config, metrics
    and evaluation results."""
    if not storage.is_remote(run):
        return Path(storage.local_path(run))
    remote = RemoteRun(os.fspath(run), reader=True)
    return remote.pull(("config.yaml", METRICS_FILE), folders=("eval",), pattern=RESULT_GLOB)


def _pipeline_of(folder: Path) -> str | None:
    """The pipeline an `evaluate pipeline --out` folder's evaluations measured (its Hub id, with the
    revision when one was asked for, or its folder); None when the folder holds none."""
    for path in result_files(folder):
        record = (read_json(path) or {}).get("pipeline")
        if record:
            name = record.get("id") or record.get("path")
            return f"{name}@{record['revision']}" if record.get("revision") else name
    return None


def _setting(evaluation: dict[str, Any], name: str) -> Any:
    return evaluation["settings"].get(name, _UNRECORDED.get(name))


def _val_loss(logged: list[dict[str, Any]], step: int | None) -> float | None:
    """The validation loss logged at ``step`` (None when none was), or the latest one."""
    if step is not None:
        logged = [m for m in logged if m["step"] == step]
    return round(logged[-1]["val_loss"], 4) if logged else None


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
