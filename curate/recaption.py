"""`curate recaption DATA/images --out DATA/captions/NAME --model qwen2-vl`.

For every accepted image of the image stage, one caption per variant (long, short, ...)
from a vision-language model. Each caption goes through quality control; a flagged one is
retried with another seed and temperature, and what still fails is recorded with its
reason. Output per image shard: DATA/captions/NAME/000123.parquet (a table, no tar) with
one row per image: the captions, word counts, flags, retries, and how they were made.

Images are decoded, turned to RGB and resized to --max-pixels in DataLoader workers,
ahead of the model, across shard boundaries, so the model never waits on JPEG decoding.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import polars as pl

from curate import storage
from curate.caption_qa import CaptionQA, check_caption
from curate.captioners.base import Captioner, CaptionRequest, Generation, Sampling
from curate.images import FILTERED_OUT, ImageStream, fit_pixels
from curate.prompts import PromptSpec, build_prompt
from curate.runner import CurateError, ShardTask, Stage, image_shards
from curate.shards import (
    OK,
    ShardWriter,
    committed_shards,
    read_index,
    stable_hash,
)
from curate.subset import SubsetRules, images_left_out

log = logging.getLogger("curate")


@dataclass(frozen=True)
class CaptionSettings:
    """What decides the captions (hashed into the stage config), apart from the model."""

    prompts: dict[str, PromptSpec]
    sampling: Sampling
    max_pixels: int = 802_816  # 1024 visual tokens of Qwen2-VL (28x28 pixels each)
    retries: int = 2
    use_orig_caption: bool = False


class RecaptionStage(Stage):
    name = "recaption"
    version = 1
    with_tar = False
    packages = ("kiln", "torch", "transformers", "vllm", "httpx2", "pillow", "polars")

    def __init__(self, images_dir: str | Path, model_name: str, open_captioner: Callable[[], Captioner],
                 settings: CaptionSettings, *, revision: str | None = None, chunk_images: int = 32,
                 decode_workers: int = 2, select: SubsetRules | None = None):
        self.images_dir = storage.as_location(images_dir)  # a folder, or a URL
        # Rules that leave images out before the model sees them (--where ...): captioning is the
        # costly step, so filter on the image stage and cheap scores first.
        self.select = select if select else None
        self.dropped: dict[str, str] = {}  # key -> the rule that leaves it out
        self.model_name, self.revision = model_name, revision
        self.open_captioner = open_captioner
        self.settings = settings
        self.variants = list(settings.prompts)
        # Column names of this table, and "orig": the original caption in every later stage (encode-latents'
        # KEY.orig.txt, a manifest's caption weights), where a variant of that name would be the alt-text.
        reserved = {"key", "status", "reason", "detail", "flags", "orig_caption", "model", "revision", "backend",
                    "sampling", "seconds", "orig"}
        if clash := reserved & set(self.variants):
            raise CurateError(f"caption variant names {sorted(clash)} are reserved (column names, and 'orig' for "
                              "the original caption in training shards and manifests); rename them")
        self.chunk_images = max(1, chunk_images)
        self.decode_workers = decode_workers
        self.captioner: Captioner | None = None
        self.stream: ImageStream | None = None
        schema: dict[str, pl.DataType] = {}
        for v in self.variants:
            schema |= {v: pl.Utf8, f"{v}_words": pl.Int32, f"{v}_flags": pl.List(pl.Utf8),
                       f"{v}_retries": pl.Int32, f"{v}_tokens": pl.Int32, f"{v}_failed_text": pl.Utf8,
                       f"{v}_prompt_hash": pl.Utf8}
        schema |= {"orig_caption": pl.Utf8, "model": pl.Utf8, "revision": pl.Utf8, "backend": pl.Utf8,
                   "sampling": pl.Utf8, "seconds": pl.Float32}
        self.index_schema = schema

    def config(self) -> dict[str, Any]:
        s = self.settings
        from curate.models import local_fingerprint

        return {"model": self.model_name, "revision": self.revision,
                "local_model_files": local_fingerprint(self.model_name),
                "prompts": {v: p.hash for v, p in s.prompts.items()}, "sampling": s.sampling.as_dict(),
                "max_pixels": s.max_pixels, "retries": s.retries, "use_orig_caption": s.use_orig_caption,
                # Only when given, so that the stages captioned before --where existed keep their hash.
                **({"select": self.select.record()} if self.select else {})}

    def provenance(self) -> dict[str, Any]:
        c = self.captioner
        return {"images": storage.resolved(self.images_dir),
                **({"backend": c.backend, "model_id": c.model_id, "resolved_revision": c.revision} if c else {})}

    def plan(self) -> list[ShardTask]:
        shards = image_shards(self.images_dir)
        # Same shard ids as the images: captions/000123.parquet describes images/000123.tar.
        return [ShardTask(s.shard_id, stable_hash([s.meta.fingerprint, s.meta.tar_sha256]),
                          s.meta.counts["ok"], (str(s.index_path), str(s.tar_path))) for s in shards]

    def prepare(self, todo: list[ShardTask]) -> None:
        if self.select:
            self.dropped = images_left_out(self.images_dir, self.select, self.name)
        self.captioner = self.open_captioner()
        self.stream = ImageStream([(t.shard_id, t.payload[1]) for t in todo],
                                  functools.partial(fit_pixels, max_pixels=self.settings.max_pixels),
                                  self.decode_workers, skip=self.dropped)

    def __exit__(self, *exc: object) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        if self.captioner is not None:
            self.captioner.close()
            self.captioner = None

    def process(self, task: ShardTask, writer: ShardWriter, progress: Callable[[int], None]) -> None:
        index = read_index(task.payload[0], columns=["key", "status", "caption"]).filter(pl.col("status") == OK)
        originals = dict(zip(index["key"].to_list(), index["caption"].to_list(), strict=True))
        rows: dict[str, dict[str, Any]] = {}
        chunk: list[tuple[str, Any]] = []
        for key, image, error in self.stream.take(task.shard_id, len(originals)):
            if key in self.dropped:
                rows[key] = {"status": "rejected", "reason": FILTERED_OUT, "detail": self.dropped[key]}
                progress(1)
                continue
            if error is not None:
                rows[key] = {"status": "rejected", "reason": "unreadable", "detail": error}
                progress(1)
                continue
            chunk.append((key, image))
            if len(chunk) == self.chunk_images:
                rows.update(self._caption_chunk(chunk, originals))
                progress(len(chunk))
                chunk = []
        if chunk:
            rows.update(self._caption_chunk(chunk, originals))
            progress(len(chunk))
        for key in originals:  # the image index's order
            row = rows[key] | {"orig_caption": originals[key]}
            if row.pop("status") == OK:
                writer.add(key, {}, row=row, flags=row.pop("flags"))
            else:
                writer.reject(key, row.pop("reason"), row=row, detail=row.pop("detail"),
                              flags=row.pop("flags", []))

    def _caption_chunk(self, chunk: list[tuple[str, Any]], originals: dict[str, str | None]) -> dict[str, dict]:
        """Every variant of every image in the chunk, retrying flagged captions; one row per image."""
        s, captioner = self.settings, self.captioner
        started = time.perf_counter()
        pending = [
            CaptionRequest(key=f"{key}/{v}", variant=v, image=image,
                           prompt=build_prompt(s.prompts[v], originals.get(key), s.use_orig_caption),
                           sampling=replace(s.sampling, max_new_tokens=s.prompts[v].max_new_tokens))
            for key, image in chunk for v in self.variants
        ]
        final: dict[str, tuple[CaptionQA, Generation, int]] = {}
        for attempt in range(s.retries + 1):
            if not pending:
                break
            tries = [replace(r, sampling=r.sampling.for_attempt(attempt)) for r in pending]
            generations = captioner.generate(tries)
            retry = []
            for request, generation in zip(pending, generations, strict=True):
                qa = check_caption(generation.text, generation.finish_reason, s.prompts[request.variant])
                final[request.key] = (qa, generation, attempt)
                if qa.failures and attempt < s.retries:
                    retry.append(request)
            pending = retry
        seconds = (time.perf_counter() - started) / len(chunk)
        sampling = json.dumps(s.sampling.as_dict(), sort_keys=True)
        return {key: self._row(key, final, seconds, sampling) for key, _ in chunk}

    def _row(self, key: str, final: dict, seconds: float, sampling: str) -> dict[str, Any]:
        c = self.captioner
        row: dict[str, Any] = {"model": c.model_id, "revision": c.revision, "backend": c.backend,
                               "sampling": sampling, "seconds": seconds}
        flags, failures = [], []
        for v in self.variants:
            qa, generation, attempt = final[f"{key}/{v}"]
            ok = not qa.failures
            row |= {v: qa.text if ok else None, f"{v}_failed_text": None if ok else generation.text[:2000],
                    f"{v}_words": qa.words, f"{v}_flags": qa.flags, f"{v}_retries": attempt,
                    f"{v}_tokens": generation.tokens, f"{v}_prompt_hash": self.settings.prompts[v].hash}
            flags += [f"{v}_{f}" for f in qa.flags] + ([f"{v}_retried"] if attempt else [])
            if not ok:
                failures.append((v, qa.failures[0], generation.error))
        row["flags"] = flags
        if not failures:
            return row | {"status": OK}
        v, reason, error = failures[0]
        detail = "; ".join(f"{v}: {r}" + (f" ({e})" if e else "") for v, r, e in failures)
        return row | {"status": "rejected", "reason": f"{v}_{reason}", "detail": detail}

    def finalize(self, out_dir: Path | str, tasks: list[ShardTask]) -> dict[str, Any]:
        return summarize_captions(out_dir, self.variants)


def _caption_table(stage_dir: str | Path) -> tuple[pl.DataFrame, list[str]] | None:
    """Every committed caption row of a stage, and its variants (None when nothing is committed)."""
    paths = [str(s.index_path) for s in committed_shards(stage_dir)]
    if not paths:
        return None
    tables = storage.parallel_map(read_index, paths, storage.is_remote(stage_dir))  # URLs: many at a time
    df = pl.concat(list(tables), how="diagonal_relaxed")
    return df, [c[: -len("_prompt_hash")] for c in df.columns if c.endswith("_prompt_hash")]


def summarize_captions(stage_dir: str | Path, variants: list[str] | None = None) -> dict[str, Any]:
    """Captions ok per variant, words mean/median/p95, generated tokens/s (for _stage.json and stats)."""
    table = _caption_table(stage_dir)
    if table is None:
        return {}
    df, found = table
    variants = found if variants is None else variants
    out: dict[str, Any] = {"images": df.height}
    tokens = 0
    for v in variants:
        ok = df.filter(pl.col(v).is_not_null())
        words = ok[f"{v}_words"].cast(pl.Float64)
        out[f"{v}_captions"] = {
            "ok": ok.height,
            "words_mean": round(words.mean(), 1) if ok.height else None,
            "words_median": words.median() if ok.height else None,
            "words_p95": words.quantile(0.95) if ok.height else None,
            "retried": int((df[f"{v}_retries"] > 0).sum()),
        }
        tokens += int(df[f"{v}_tokens"].sum() or 0)
    seconds = float(df["seconds"].sum() or 0.0)
    out["generated_tokens_per_second_per_worker"] = round(tokens / seconds, 1) if seconds else None
    return out


def plot_caption_lengths(stage_dir: str | Path, png: str | Path, bins: int = 40) -> Path:
    """A PNG histogram of caption lengths (words) per variant, drawn with PIL (no plotting dependency)."""
    from PIL import Image, ImageDraw

    table = _caption_table(stage_dir)
    if table is None:
        raise CurateError(f"{stage_dir}: no caption shards")
    df, variants = table
    if not variants:
        raise CurateError(f"{stage_dir}: no caption variants to plot (--plot draws a caption stage's lengths)")
    if Path(png).suffix.lower() not in Image.registered_extensions():
        raise CurateError(f"--plot {png}: give an image file name (.png)")
    panel_w, panel_h, margin = 640, 220, 40
    img = Image.new("RGB", (panel_w, panel_h * len(variants)), "white")
    draw = ImageDraw.Draw(img)
    colours = [(52, 101, 164), (204, 102, 0), (78, 154, 6), (117, 80, 123)]
    for i, v in enumerate(variants):
        words = df.filter(pl.col(v).is_not_null())[f"{v}_words"].to_list()
        top = i * panel_h
        draw.text((margin, top + 8), f"{v}: {len(words)} captions, words per caption", fill="black")
        if not words:
            continue
        lo, hi = min(words), max(words) + 1
        width = max(1, -(-(hi - lo) // bins))
        counts = [0] * (-(-(hi - lo) // width))
        for w in words:
            counts[(w - lo) // width] += 1
        plot_w, plot_h = panel_w - 2 * margin, panel_h - 2 * margin - 10
        bar_w = plot_w / len(counts)
        for j, c in enumerate(counts):
            h = plot_h * c / max(counts)
            x0 = margin + j * bar_w
            y1 = top + panel_h - margin
            draw.rectangle((x0, y1 - h, x0 + max(1.0, bar_w - 1), y1), fill=colours[i % len(colours)])
        draw.line((margin, top + panel_h - margin, panel_w - margin, top + panel_h - margin), fill="black")
        draw.text((margin, top + panel_h - margin + 4), str(lo), fill="black")
        draw.text((panel_w - margin - 30, top + panel_h - margin + 4), str(hi - 1), fill="black")
        draw.text((panel_w - margin - 90, top + 8), f"max bin {max(counts)}", fill="black")
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    img.save(png)
    return png
