"""`curate stats DATA/STAGE`: what a stage produced and what it rejected, and why."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from curate.images import REASONS
from curate.runner import STAGE_FILE, CurateError
from curate.shards import add_counts, committed_shards


def stage_stats(stage_dir: str | os.PathLike) -> dict[str, Any]:
    """_stage.json when the stage is complete; otherwise totals over the shards committed so far."""
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        raise CurateError(f"{stage_dir}: no such folder")
    stage_file = stage_dir / STAGE_FILE
    shards = committed_shards(stage_dir)
    if stage_file.exists():
        stats = json.loads(stage_file.read_text())
        stats["committed_shards"] = len(shards)
        return stats
    if not shards:
        raise CurateError(f"{stage_dir}: no committed shards and no {STAGE_FILE}: not a stage output")
    totals: dict[str, Any] = {}
    for shard in shards:
        totals = add_counts(totals, shard.meta.counts)
    return {"stage": shards[0].meta.stage, "complete": False, "committed_shards": len(shards), "totals": totals}


def format_stats(stats: dict[str, Any], stage_dir: str | os.PathLike = "") -> str:
    totals = stats.get("totals", {})
    seen = totals.get("seen", 0) or 0
    lines = [f"{stage_dir}  stage: {stats.get('stage')}  "
             + ("complete" if stats.get("complete") else "INCOMPLETE (still running, or killed: rerun it)")]
    shards = stats.get("shards", stats.get("committed_shards"))
    lines.append(f"  shards    {shards}")

    def pct(n: int) -> str:
        return f"{100 * n / seen:5.1f}%" if seen else "   - "

    lines.append(f"  seen      {seen:>10,}")
    lines.append(f"  ok        {totals.get('ok', 0):>10,}  {pct(totals.get('ok', 0))}")
    lines.append(f"  rejected  {totals.get('rejected', 0):>10,}  {pct(totals.get('rejected', 0))}")
    for reason, n in sorted(totals.get("reasons", {}).items(), key=lambda kv: -kv[1]):
        lines.append(f"    {reason:<18}{n:>8,}  {pct(n)}  {REASONS.get(reason, '')}")
    if totals.get("flags"):
        lines.append("  flags (accepted, noted)")
        for flag, n in sorted(totals["flags"].items(), key=lambda kv: -kv[1]):
            lines.append(f"    {flag:<18}{n:>8,}  {pct(n)}")
    throughput = stats.get("throughput") or {}
    for name, value in throughput.items():
        if value is not None:
            lines.append(f"  {name.replace('_', ' ')}: {value:,}")
    summary = stats.get("summary") or {}
    for name, value in summary.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
            lines.append(f"  {name.replace('_', ' ')}: {inner}")
        else:
            lines.append(f"  {name.replace('_', ' ')}: {_fmt(value)}")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
