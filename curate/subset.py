"""Sample-level subsets of a manifest: ``curate manifest long.json --where "..." --name NAME``.

The data-centric ablations train on a filtered dataset (high resolution only, an aesthetic
score above a threshold, no watermarks, a random tenth for a data-scaling curve) far more often
than on a re-encoded one. A subset keeps the shards as they are and marks, per shard entry of the
manifest, which of its accepted samples are used (``ShardEntry.subset``, a bit mask); the loader,
``check_data``, the validation set, ``evaluate`` and ``curate stats`` read only those.

Rules, all of which a sample must pass:

- ``--where EXPR`` (repeatable): a SQL expression (polars' SQL dialect) over the sample's columns:
  the latent index's (``orig_w``, ``orig_h``, ``bucket_h``, ``bucket_w``, ``captions``, ``flags``),
  the image stage's (``width``, ``height``, ``bytes``, ``format``, ``mode``, ``source``,
  ``caption``, ``image_flags``), the caption stage's (``long``, ``short``, ``long_words``,
  ``short_words``, ``caption_flags``...) and those of ``--scores`` tables. A column of a later
  source that an earlier one already has is named with the source's prefix (``image_``,
  ``caption_``). A sample for which the expression is null (a score it does not have) fails it.
- ``--scores FILE`` (repeatable): a table (parquet, csv, tsv, jsonl) with a ``key`` column (the
  sample keys of the stages) or a ``source`` column (the image stage's, e.g. the URL), and
  columns of any name: what an aesthetic, watermark or CLIP-score model wrote; or the folder of
  ``curate score`` (``clip_long``, ``aesthetic``... and its flags as ``score_flags``).
- ``--keep FILE`` / ``--exclude FILE``: only / all but the samples listed (a table as above, or a
  text file of keys, one per line); ``--exclude`` repeats, each table a rule of its own.
- ``--fraction F``: a random fraction, drawn per sample from (seed, key), so a 10% subset lies
  inside the 20% one of the same seed, and a sample listed twice is drawn once.
- ``--unique`` (a merged manifest): a sample whose content is in several parts is kept in the
  first of them only.

Subsetting a subset narrows it. Every rule is recorded in the manifest's provenance.
"""

from __future__ import annotations

import codecs
import io
import logging
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from curate import storage
from curate.manifest import (
    Manifest,
    ManifestError,
    _mean_selection,
    _with_part,
    file_sha256,
    latent_index_rows,
    part_provenance,
    shard_subset,
    shard_urls,
)
from curate.shards import index_columns, index_of, read_index

__all__ = ["SubsetReport", "SubsetRules", "hold_out_samples", "images_left_out",
           "subset_manifest", "subset_summary"]

# Index columns that describe a stage's processing, not the sample.
_BOOKKEEPING = {"status", "reason", "detail", "tar_offset", "tar_length"}
# `curate score --embeddings`' CLIP image embeddings (for curate dedup): no column to filter on.
EMBEDDING_COLUMN = "image_embedding"
_KEY_COLUMNS = ("key", "source")
# What the subset's rows hold besides the samples' columns (latent_index_rows, _with_part): where
# each sample is listed. A table's column of one of these names would be shadowed by it.
_ROW_COLUMNS = ("shard", "ordinal", "part")
_TABLE_SUFFIXES = (".parquet", ".csv", ".tsv", ".jsonl", ".ndjson", ".txt")

log = logging.getLogger("curate")


@dataclass(frozen=True)
class SubsetRules:
    where: list[str] = field(default_factory=list)
    # Tables and `curate score` folders, local (Path) or at URLs (str: curate.storage.as_location).
    scores: list[Path | str] = field(default_factory=list)
    keep: Path | str | None = None
    exclude: list[Path | str] = field(default_factory=list)  # each table's samples are dropped
    fraction: float | None = None
    seed: int = 0  # of the fraction's draw
    unique: bool = False  # a merged manifest: a sample in several parts stays in the first only

    def __bool__(self) -> bool:
        return bool(self.where or self.keep or self.exclude or self.fraction is not None or self.unique)

    def record(self) -> dict[str, Any]:
        """The rules as the manifest's provenance keeps them (files with their sha256)."""
        def file(path: Path | str) -> dict[str, str]:
            if _is_folder(path):  # a stage folder: its indexes' hashes, hashed
                from curate.shards import stable_hash

                indexes = stage_indexes(path)
                hashes = storage.parallel_map(file_sha256, indexes, storage.is_remote(path))
                return {"path": storage.resolved(path), "indexes": stable_hash(list(hashes))}
            return {"path": storage.resolved(path), "sha256": file_sha256(path)}

        out: dict[str, Any] = {}
        if self.where:
            out["where"] = list(self.where)
        if self.scores:
            out["scores"] = [file(p) for p in self.scores]
        if self.keep is not None:
            out["keep"] = file(self.keep)
        if self.exclude:  # one table as one record, as before several were allowed (stage configs keep their hash)
            out["exclude"] = file(self.exclude[0]) if len(self.exclude) == 1 else [file(p) for p in self.exclude]
        if self.fraction is not None:
            out |= {"fraction": self.fraction, "seed": self.seed}
        if self.unique:
            out["unique"] = True
        return out


@dataclass(frozen=True)
class SubsetReport:
    of: int  # samples of an epoch before (a repeated shard's once per listing)
    kept: int
    rules: list[tuple[str, int, int]]  # (rule, samples it drops, of those how many for a null value)


def subset_manifest(manifest: Manifest, manifest_path: str | os.PathLike, rules: SubsetRules
                    ) -> tuple[Manifest, SubsetReport]:
    """The samples of ``manifest`` that pass ``rules``, as a manifest whose shard paths are those of
    ``manifest`` (relative to ``manifest_path``'s folder); shards and parts left without a sample
    are dropped from it. Raises ManifestError for a rule that cannot be applied (unknown column,
    unreadable table) or that keeps no sample."""
    if rules.unique and manifest.parts is None:
        raise ManifestError(f"--unique keeps a sample that is in several parts of a merged manifest in the first "
                            f"one only, but {manifest_path} merges no datasets: give several manifests to merge")
    loaded = _load(rules)
    rows = _sample_rows(manifest, manifest_path, loaded, rules)
    keep, report_rules, _ = _evaluate(rows, _passes(rules, loaded, rows))
    if rules.unique:  # last: of a sample's listings that pass the rules, those of its first part stay
        first = (rows.select("key", "part").with_columns(pl.Series("kept", keep))
                 .select(pl.col("kept") & (pl.col("part") == pl.col("part").filter(pl.col("kept")).min().over("key"))
                         .fill_null(False))).to_series().to_numpy()
        report_rules.append(("--unique (first part only)", int(keep.sum() - first.sum()), 0))
        keep = first

    if not keep.any():
        raise ManifestError(f"{manifest_path}: no sample passes the rules (of {rows.height}: "
                            + "; ".join(f"{label} drops {dropped}" for label, dropped, _ in report_rules) + ")")
    subset = _apply(manifest, rows, keep)
    subset = subset.model_copy(update={"provenance": {
        **manifest.provenance,
        "subsets": [*manifest.provenance.get("subsets", []),
                    {"from": {"path": storage.resolved(manifest_path), "name": manifest.name},
                     **rules.record(), "kept": int(keep.sum()), "of": rows.height}]}})
    return Manifest.model_validate(subset.model_dump()), SubsetReport(rows.height, int(keep.sum()), report_rules)


@dataclass(frozen=True)
class _Loaded:
    """What the rules name, parsed and read once: the --where expressions, the --scores tables, the
    --keep and --exclude tables, and the column names the expressions use."""

    expressions: list[pl.Expr]
    scores: list[pl.DataFrame]
    keep: pl.DataFrame | None
    exclude: list[pl.DataFrame]
    wanted: set[str]


def _load(rules: SubsetRules) -> _Loaded:
    if rules.fraction is not None and not 0 < rules.fraction < 1:
        raise ManifestError(f"--fraction {rules.fraction}: give a fraction between 0 and 1 (exclusive)")
    expressions = [_parse(text) for text in rules.where]
    return _Loaded(expressions, [_read_table(p, "--scores") for p in rules.scores],
                   _read_table(rules.keep, "--keep") if rules.keep is not None else None,
                   [_read_table(p, "--exclude") for p in rules.exclude],
                   {name for e in expressions for name in e.meta.root_names()})


def _passes(rules: SubsetRules, loaded: _Loaded, rows: pl.DataFrame) -> list[tuple[str, pl.Expr]]:
    """Each rule (but --unique) as (its label, a boolean expression over ``rows``), in the options' order."""
    passes = [(f"--where {text}", e) for text, e in zip(rules.where, loaded.expressions, strict=True)]
    if loaded.keep is not None:
        passes.append((f"--keep {rules.keep}", pl.col("key").is_in(_listed_keys(loaded.keep, rows))))
    for path, table in zip(rules.exclude, loaded.exclude, strict=True):
        passes.append((f"--exclude {path}", ~pl.col("key").is_in(_listed_keys(table, rows))))
    if rules.fraction is not None:
        drawn = _fraction_draw(rows["key"], rules.fraction, rules.seed)
        passes.append((f"--fraction {rules.fraction:g} (seed {rules.seed})", pl.lit(pl.Series(drawn))))
    return passes


def _evaluate(rows: pl.DataFrame, passes: list[tuple[str, pl.Expr]]
              ) -> tuple[np.ndarray, list[tuple[str, int, int]], np.ndarray]:
    """(which rows pass every rule, per rule (label, rows it drops, of those with a null value),
    per row the index of the first rule it fails or -1)."""
    keep, report, first = np.ones(rows.height, dtype=bool), [], np.full(rows.height, -1)
    for i, (label, expression) in enumerate(passes):
        try:
            value = rows.select(expression.alias("value"))["value"]
        except pl.exceptions.ColumnNotFoundError as e:
            raise ManifestError(f"{label}: {e}") from None
        except pl.exceptions.PolarsError as e:
            raise ManifestError(f"{label}: cannot evaluate it on the samples' columns: {e}") from None
        if value.dtype != pl.Boolean:
            raise ManifestError(f"{label}: gives {value.dtype} values, not true or false")
        if len(value) == 1 and rows.height != 1:  # one value for all (an aggregate, a constant): each sample's
            value = value.new_from_index(0, rows.height)
        passed = value.fill_null(False).to_numpy()
        report.append((label, int((~passed).sum()), int(value.is_null().sum())))
        first[(first < 0) & ~passed] = i
        keep &= passed
    return keep, report, first


def _parse(text: str) -> pl.Expr:
    try:
        return pl.sql_expr(text)
    except pl.exceptions.PolarsError as e:
        raise ManifestError(f"--where {text!r}: not a SQL expression: {e}") from None


def _read_table(path: Path | str, option: str) -> pl.DataFrame:
    """A table of samples (by ``key`` or ``source``); a ``.txt`` file is a list of keys. A file or
    a `curate score` folder, here or at a URL."""
    suffix = posixpath.splitext(str(path))[1].lower()
    try:
        if _is_folder(path):
            table = _stage_scores(path, option)
        elif suffix not in _TABLE_SUFFIXES:
            raise ManifestError(f"{option} {path}: give a .parquet, .csv, .tsv, .jsonl or .txt (keys) file")
        else:
            data = io.BytesIO(storage.read_bytes(path))
            if suffix != ".parquet" and data.read(3) != codecs.BOM_UTF8:  # as Windows' editors and Excel save text
                data.seek(0)
            if suffix == ".parquet":
                table = pl.read_parquet(data)
            # Column types from every row, not polars' first 100: a score column whose first rows are
            # whole numbers (`5`, as R and JavaScript write 5.0) or empty is no less a float column.
            elif suffix in (".csv", ".tsv"):
                table = pl.read_csv(data, separator="\t" if suffix == ".tsv" else ",", infer_schema_length=None)
            elif suffix in (".jsonl", ".ndjson"):
                table = pl.read_ndjson(data, infer_schema_length=None)
            else:
                keys = [line.strip() for line in data.read().decode().splitlines() if line.strip()]
                table = pl.DataFrame({"key": keys}, schema={"key": pl.String})
    except FileNotFoundError:
        raise ManifestError(f"{option} {path}: no such file") from None
    except (OSError, UnicodeDecodeError, pl.exceptions.PolarsError) as e:  # Unicode: a binary file named .txt
        raise ManifestError(f"{option} {path}: cannot read it as its suffix says: {e}") from None
    by = [c for c in _KEY_COLUMNS if c in table.columns]
    if len(by) != 1:
        raise ManifestError(f"{option} {path}: needs exactly one of the columns key (the samples' keys) or source "
                            f"(the image stage's sources) to match samples by; it has {', '.join(table.columns)}")
    if table[by[0]].dtype != pl.String:
        raise ManifestError(f"{option} {path}: its {by[0]} column holds {table[by[0]].dtype}, not text")
    twice = table.filter(pl.col(by[0]).is_duplicated())
    if twice.height:
        raise ManifestError(f"{option} {path}: lists {by[0]} {twice[by[0]][0]!r} more than once")
    return table


def _is_folder(path: Path | str) -> bool:
    """A folder (a `curate score` stage) rather than a table file: at a URL, whatever does not end
    as a table does (a stage's URL is a prefix, which an object store cannot tell from a file's)."""
    if storage.is_remote(path):
        return posixpath.splitext(str(path).rstrip("/"))[1].lower() not in _TABLE_SUFFIXES
    return Path(path).is_dir()


def _stage_scores(stage: Path | str, option: str) -> pl.DataFrame:
    """A stage folder's accepted rows (``curate score``'s output), by key; its flags as ``score_flags``."""
    from curate.shards import committed_shards

    shards = committed_shards(stage)
    if not shards:
        raise ManifestError(f"{option} {stage}: a folder, but no stage's committed shards (such as DATA/scores/clip)")
    columns = [c for c in index_columns(shards[0].index_path, shards[0].index_bytes) if c != EMBEDDING_COLUMN]
    tables = storage.parallel_map(lambda s: read_index(s.index_path, columns, s.index_bytes), shards,
                                  storage.is_remote(stage))  # URLs: many at a time
    table = pl.concat(list(tables), how="diagonal_relaxed")
    return (table.filter(pl.col("status") == "ok").drop(*_BOOKKEEPING, strict=False)
            .rename({"flags": "score_flags"}, strict=False))


def stage_indexes(stage: Path | str) -> list[Path | str]:
    """A stage's shard indexes in shard order (a URL's listed), not the other tables a folder may
    hold (`curate dedup` writes its own beside a score stage's shards)."""
    from curate.shards import listed_shard_ids, shard_name

    names = [f"{shard_name(i)}.parquet" for i in listed_shard_ids(stage, missing_ok=False)]
    return [storage.join(stage, n) for n in names] if storage.is_remote(stage) else [Path(stage) / n for n in names]


def _stage_columns(stage: Path | str) -> list[str]:
    first = next(iter(stage_indexes(stage)), None)
    return [] if first is None else index_columns(first)


def _is_stage(path: str | os.PathLike) -> bool:
    """Whether a stage is there: a folder, or a URL with its _stage.json."""
    from curate.runner import STAGE_FILE

    return storage.is_file(storage.join(path, STAGE_FILE)) if storage.is_remote(path) else Path(path).is_dir()


def _stage_mapping(stage: Path | str | list[Path | str] | None, prefix: str,
                   taken: set[str] | dict[str, str]) -> dict[str, str]:
    """A stage's sample columns as rules name them (index column -> name): prefixed with ``prefix``
    where ``taken`` has the name already (the latent index's ``flags``: ``image_flags``). Given
    several stages (the parts of a merged manifest), every column any of them has."""
    stages = [] if stage is None else stage if isinstance(stage, list) else [stage]
    columns = dict.fromkeys(c for s in stages for c in _stage_columns(s))
    return {c: (prefix + c if c in taken else c) for c in columns if c not in _BOOKKEEPING and c != "key"}


def _stage_table(stage: Path | str, columns: dict[str, str]) -> pl.DataFrame:
    """The accepted rows of a stage's indexes: ``key`` and ``columns`` (name in the index -> name
    in the subset's view); null where the stage has no such column (a merged manifest's part
    captioned without the variant another part's stage has)."""
    indexes = stage_indexes(stage)
    if not indexes:
        raise ManifestError(f"{stage}: no index files: the stage is not there")
    has = set(index_columns(indexes[0]))
    present = [c for c in columns if c in has]
    read = storage.parallel_map(lambda p: read_index(p, columns=["key", "status", *present]), indexes,
                                storage.is_remote(stage))  # URLs: many at a time
    table = pl.concat([table.filter(pl.col("status") == "ok") for table in read]).drop("status")
    return table.with_columns(pl.lit(None).alias(c) for c in columns if c not in has).rename(columns)


def _sample_rows(manifest: Manifest, manifest_path: str | os.PathLike, loaded: _Loaded,
                 rules: SubsetRules) -> pl.DataFrame:
    """One row per sample the manifest uses (per listing), with ``shard``, ``ordinal``, ``key`` and
    every column ``wanted`` names, joined from the stages and the score tables."""
    unreadable = ManifestError(f"{manifest_path}: the indexes of its shards cannot be read (pipe: shards, "
                               "or index files missing); a subset is chosen from them")
    first_tar = shard_urls(manifest, manifest_path)[0]
    first_index = index_of(first_tar)
    if not first_tar.endswith(".tar") or not storage.is_file(first_index):
        raise unreadable
    latent_columns = [c for c in index_columns(first_index) if c not in _BOOKKEEPING]
    available: dict[str, str] = {c: "the latent index" for c in latent_columns}
    # Per source: index column -> the name it gets here (prefixed when an earlier source has it).
    stage_maps: dict[str, dict[str, str]] = {}
    provenances = part_provenance(manifest)
    for stage, prefix in (("images", "image_"), ("captions", "caption_")):
        recorded = [(p.get(stage) or {}).get("path") for p in provenances]
        found = [storage.as_location(r) for r in dict.fromkeys(recorded) if r and _is_stage(r)]
        mapping = _stage_mapping(found, prefix, available)  # a merged manifest's parts: every column of theirs
        stage_maps[stage] = mapping
        available |= {name: f"the {stage} stage" for name in mapping.values()}
    wanted = loaded.wanted
    by_source = _check_columns(available, loaded, rules)
    need = {stage: {c: name for c, name in mapping.items()
                    if name in wanted or (stage == "images" and c == "source" and by_source)}
            for stage, mapping in stage_maps.items()}
    rows = latent_index_rows(manifest, manifest_path, ["key", *[c for c in latent_columns
                                                               if c in wanted and c != "key"]])
    if rows is None:
        raise unreadable
    rows = _with_part(manifest, rows)
    for stage, columns in need.items():
        if columns:
            rows = _join_stage(rows, manifest, stage, columns)
    return _join_scores(rows, loaded.scores, rules).sort("shard", "ordinal")


def _check_columns(available: dict[str, str], loaded: _Loaded, rules: SubsetRules,
                   row_columns: tuple[str, ...] = _ROW_COLUMNS) -> bool:
    """Add the score tables' columns to ``available`` (column -> its source), refusing a name two
    sources have, one of ``row_columns`` (the rows' own) and a ``--where`` name none has; whether a
    table matches samples by ``source``."""
    for path, table in zip(rules.scores, loaded.scores, strict=True):
        reserved = [c for c in table.columns if c in row_columns]
        if reserved:
            raise ManifestError(f"--scores {path}: its column(s) {', '.join(reserved)} are names the subset's rows "
                                f"use for where each sample is listed ({', '.join(_ROW_COLUMNS)}): rename them")
        clash = [c for c in table.columns if c not in _KEY_COLUMNS and c in available]
        if clash:
            raise ManifestError(f"--scores {path}: its column(s) {', '.join(clash)} are already "
                                f"{available[clash[0]]}'s: rename them")
        available |= {c: str(path) for c in table.columns if c not in _KEY_COLUMNS}
    unknown = sorted(loaded.wanted - set(available))
    if unknown:
        raise ManifestError(f"--where names {', '.join(unknown)}, which no source has; the columns are: "
                            + "; ".join(f"{source}: {', '.join(c for c, s in available.items() if s == source)}"
                                        for source in dict.fromkeys(available.values())))
    listed = [loaded.keep] if loaded.keep is not None else []
    return any("source" in t.columns for t in [*loaded.scores, *listed, *loaded.exclude])


def _join_scores(rows: pl.DataFrame, scores: list[pl.DataFrame], rules: SubsetRules) -> pl.DataFrame:
    """``rows`` with the score tables' columns, matched by key or by the image stage's source."""
    samples = rows.height
    for path, table in zip(rules.scores, scores, strict=True):
        by = "key" if "key" in table.columns else "source"
        if by == "source" and "source" not in rows.columns:
            raise ManifestError(f"--scores {path}: matches samples by source, but the image stage is not there")
        rows = rows.join(table, on=by, how="left")
    if rows.height != samples:
        raise ManifestError("a source of the image stage is the source of more than one sample: match the "
                            "--scores, --keep or --exclude tables by key")
    return rows


def _join_stage(rows: pl.DataFrame, manifest: Manifest, stage: str, columns: dict[str, str]) -> pl.DataFrame:
    """``rows`` with ``columns`` of the ``stage`` (images or captions) each part was made from."""
    frames, tables = [], {}
    for part, provenance in enumerate(part_provenance(manifest)):
        recorded = (provenance.get(stage) or {}).get("path")
        mine = rows.filter(pl.col("part") == part)
        if mine.height == 0:
            continue
        if not recorded or not _is_stage(recorded):
            where = f"provenance.{stage}.path" if manifest.parts is None else f"parts.{part}.provenance.{stage}.path"
            raise ManifestError(f"the columns {', '.join(columns.values())} come from the {stage} stage, but "
                                f"{where} ({recorded or 'not recorded'}) is not a folder here")
        if recorded not in tables:
            tables[recorded] = _stage_table(storage.as_location(recorded), columns)
        frames.append(mine.join(tables[recorded], on="key", how="left"))
    return pl.concat(frames, how="vertical_relaxed")


def _listed_keys(table: pl.DataFrame, rows: pl.DataFrame) -> pl.Series:
    """The keys a --keep or --exclude table lists (by key, or by the image stage's source)."""
    if "key" in table.columns:
        return table["key"]
    return rows.filter(pl.col("source").is_in(table["source"]))["key"]


def _fraction_draw(keys: pl.Series, fraction: float, seed: int) -> np.ndarray:
    """True for the samples in the fraction: a uniform draw per (seed, key) that never depends on
    the other samples."""
    return _key_draws(keys, seed) < np.uint64(min(int(fraction * 2**64), 2**64 - 1))


def _key_draws(keys: pl.Series, seed: int) -> np.ndarray:
    """A uniform 64-bit draw per (seed, key), as uint64. A key is a 128-bit content hash in hex; its
    two 64-bit halves go through SplitMix64's finaliser with the seed (vectorised: 0.3 s a
    million, where BLAKE2b per key in Python took 1.4 s)."""
    try:
        words = [keys.str.slice(start, 8).str.to_integer(base=16).cast(pl.UInt64).to_numpy()
                 for start in (0, 8, 16, 24)]
    except pl.exceptions.PolarsError as e:
        raise ManifestError("a random draw per sample is made from its key, which must be a hex content hash: "
                            f"{str(e).splitlines()[0]}") from None
    with np.errstate(over="ignore"):
        high, low = (words[0] << np.uint64(32)) | words[1], (words[2] << np.uint64(32)) | words[3]
        # Any integer seed, as its 64 bits (a negative one wraps around; one of 64 bits is itself).
        salt = _splitmix64(np.array([seed % 2**64], dtype=np.uint64))
        return _splitmix64(_splitmix64(high ^ salt) ^ low)


# What mixes the held-out samples' draw apart from every --fraction's (b"held-out" as a number).
_HELD_OUT_STREAM = np.uint64(int.from_bytes(b"held-out", "big"))


def _held_out_draws(keys: pl.Series) -> np.ndarray:
    """A uniform 64-bit draw per key for ``--hold-out-samples``, unrelated to ``--fraction``'s of any
    seed: were they one, the held-out samples would be those that every fraction of seed 0 takes
    first, so that a fraction of the training manifest kept fewer samples than asked, and a
    fraction of the whole set held every held-out sample."""
    return _splitmix64(_key_draws(keys, 0) ^ _HELD_OUT_STREAM)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Steele et al. 2014): a bijection that mixes every input bit."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def images_left_out(images_dir: str | os.PathLike, rules: SubsetRules, stage: str) -> dict[str, str]:
    """The accepted images of ``images_dir`` that ``rules`` leave out (key -> the first rule it
    fails), over the image stage's columns (``width``, ``height``, ``bytes``, ``format``,
    ``mode``, ``source``, ``caption``, ``image_flags``) and the ``--scores`` tables' (a ``curate
    score`` folder of this stage, say): so that an expensive stage (recaption, encode-latents)
    runs on the images worth it only. A rule that cannot be applied is the stage's CurateError."""
    from curate.runner import CurateError

    images_dir = storage.as_location(images_dir)
    try:
        if rules.unique:
            raise ManifestError("--unique applies to merged manifests, not to an image stage")
        loaded = _load(rules)
        mapping = _stage_mapping(images_dir, "image_", {"flags"})  # named as in a manifest's rules
        available = {name: "the image stage" for name in mapping.values()}
        by_source = _check_columns(available, loaded, rules, row_columns=())  # rows of the image stage's columns
        rows = _stage_table(images_dir, {c: name for c, name in mapping.items()
                                         if name in loaded.wanted or (c == "source" and by_source)})
        rows = _join_scores(rows, loaded.scores, rules)
        passes = _passes(rules, loaded, rows)
        _, report, first = _evaluate(rows, passes)
    except ManifestError as e:
        raise CurateError(str(e)) from None
    dropped = {key: passes[i][0] for key, i in zip(rows["key"].to_list(), first.tolist(), strict=True) if i >= 0}
    log.info("%s: the rules leave out %d of %d images (%s)", stage, len(dropped), rows.height,
             "; ".join(f"{label}: drops {n}" for label, n, _ in report))
    return dropped


def hold_out_samples(manifest: Manifest, manifest_path: str | os.PathLike, samples: int
                     ) -> tuple[Manifest, Manifest]:
    """(the manifest without ``samples`` of its samples, a manifest of those), both with the shard
    paths of ``manifest``: held-out samples for the validation loss, drawn at random (from the key,
    :func:`_held_out_draws`: the same ones every time, and 100 held out lie among the 200 held out)
    from every shard, rather than whole shards."""
    if manifest.parts is not None:
        raise ManifestError(f"{manifest_path} merges {len(manifest.parts)} datasets: hold samples out of each "
                            "dataset's manifest, then merge the rest")
    rows = latent_index_rows(manifest, manifest_path, ["key"])
    if rows is None:
        raise ManifestError(f"{manifest_path}: the indexes of its shards cannot be read (pipe: shards, or "
                            "index files missing); the held-out samples are drawn from them")
    if not 0 < samples < rows.height:
        raise ManifestError(f"--hold-out-samples {samples}: {manifest_path} has {rows.height} samples; hold out at "
                            "least 1 and leave at least 1 to train on")
    held = np.zeros(rows.height, dtype=bool)
    held[np.argsort(_held_out_draws(rows["key"]), kind="stable")[:samples]] = True
    source = {"path": storage.resolved(manifest_path), "sha256": file_sha256(manifest_path), "samples": samples}

    def part(keep: np.ndarray, this: str) -> Manifest:
        subset = _apply(manifest, rows, keep)
        provenance = {**manifest.provenance, "held_out": {**source, "this": this}}
        return Manifest.model_validate(subset.model_copy(update={"provenance": provenance}).model_dump())

    return part(~held, "the rest"), part(held, "held out")


def _apply(manifest: Manifest, rows: pl.DataFrame, keep: np.ndarray) -> Manifest:
    """``manifest`` using only the rows where ``keep``: new subsets of its entries, the entries and
    parts left empty dropped."""
    shard, ordinal = rows["shard"].to_numpy(), rows["ordinal"].to_numpy()  # sorted by (shard, ordinal)
    bounds = np.searchsorted(shard, np.arange(len(manifest.shards) + 1))
    entries, text_entries, kept_index = [], [], []
    for i, entry in enumerate(manifest.shards):
        mine = slice(bounds[i], bounds[i + 1])
        used = np.zeros(entry.accepted, dtype=bool)
        used[ordinal[mine][keep[mine]]] = True
        if not used.any():
            continue
        kept_index.append(i)
        entries.append(entry.model_copy(update={"samples": int(used.sum()), "subset": shard_subset(used)}))
        if manifest.text is not None:
            text_entries.append(manifest.text.shards[i])
    parts = None
    if manifest.parts is not None:
        parts, start = [], 0
        for part in manifest.parts:
            mine = [e for i, e in zip(kept_index, entries, strict=True) if start <= i < start + part.shards]
            start += part.shards
            if not mine:
                raise ManifestError(f"no sample of part {part.name!r} passes the rules: subset the manifests "
                                    "before merging, or merge without it")
            parts.append(part.model_copy(update={"shards": len(mine), "samples": sum(e.samples for e in mine)}))
    text = manifest.text.model_copy(update={"shards": text_entries}) if manifest.text is not None else None
    return manifest.model_copy(update={
        "shards": entries, "samples": sum(e.samples for e in entries), "text": text, "parts": parts,
        "captions": _mean_selection(parts) if parts is not None else manifest.captions})


def subset_summary(record: dict[str, Any]) -> str:
    """A subset of a manifest's ``provenance.subsets`` in the options' words:
    ``6 of 48 samples of long: --where orig_w >= 512, --fraction 0.5 (seed 0)``."""
    rules = [f"--where {w}" for w in record.get("where", [])]
    rules += [f"--scores {s['path']}" for s in record.get("scores", [])]
    for option in ("keep", "exclude"):
        tables = record.get(option, [])
        rules += [f"--{option} {t['path']}" for t in (tables if isinstance(tables, list) else [tables])]
    if "fraction" in record:
        rules.append(f"--fraction {record['fraction']:g} (seed {record.get('seed', 0)})")
    if record.get("unique"):
        rules.append("--unique")
    return f"{record.get('kept')} of {record.get('of')} samples of {record.get('from', {}).get('name')}: " + ", ".join(
        rules)
