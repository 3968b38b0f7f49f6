"""The evaluation set of a manifest: which samples, their prompts, and their real images.

FID compares ``n`` generated images with the real images of ``n`` samples of the training data:
a seeded random choice over every sample the manifest lists (the same keys for ``long.json``,
``short.json`` and ``mix.json``, which share their shards, so runs trained on different caption
selections are measured against the same real images). Sample ``i`` of the set is generated from
its own caption with its own noise (``seed + i``), so the set does not depend on batch sizes or
on how many GPUs share the work.

The prompt of a sample follows the manifest's caption selection, drawn as the trainer draws it
(``train.data.choose_caption``, with its fallbacks for missing captions); ``variant`` fixes one
variant instead (for measuring a long-caption run on short prompts, say). The real image is the
original from the image stage, resized and centre-cropped to the square ``resolution`` by the
same code that prepared it for the VAE (``curate.buckets.preprocess``).

A benchmark's prompt file (``evaluate run --prompts``) gives an evaluation set without real
images: its prompts in order, prompt ``i`` with noise ``seed + i`` as above.

The manifest, its shards and the image stage may be URLs (curate/storage.py). A local tar is
walked, seeking over the members not wanted; at a URL each chosen sample is fetched by itself (neighbours together), at the
offset and length its shard's index records, since 10,000 samples drawn from a million are a few
in each shard and read-ahead chunks would fetch megabytes around each.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import posixpath
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from curate import storage
from curate.buckets import IMAGE_MEMBER, preprocess
from curate.manifest import (
    Manifest,
    ManifestError,
    image_stages,
    part_captions,
    shard_parts,
    shard_urls,
)
from curate.runner import CurateError
from curate.shards import (
    OK,
    ShardError,
    index_of,
    iter_tar_samples,
    owned_samples,
    read_index,
    shard_name,
)
from train.data import choose_caption

__all__ = ["EvalSample", "EvalSetError", "choose_samples", "images_dir_of", "prompt_samples", "real_batches",
           "real_images"]


class EvalSetError(CurateError):
    """The manifest's shards or the image stage do not give the evaluation set."""


@dataclass(frozen=True)
class EvalSample:
    index: int  # position in the evaluation set: its noise seed is seed + index
    shard: int  # shard id, shared by the latent shard and the image shard
    key: str
    variant: str  # the caption variant used, "" when the sample has no caption at all
    caption: str
    part: int = 0  # the part of a merged manifest it belongs to, whose image stage holds its original


def prompt_samples(path: str | os.PathLike[str], n: int) -> list[EvalSample]:
    """The first ``n`` prompts of a benchmark's prompt file (one a line, blank lines skipped; or a
    ``.json`` list of strings), as samples without real images (shard -1, key ``prompt-INDEX``)."""
    path = Path(path)
    if n < 1:
        raise EvalSetError(f"the evaluation set needs at least 1 sample, got {n}")
    try:
        text = path.read_text(encoding="utf-8")
        prompts = json.loads(text) if path.suffix == ".json" else [line.strip() for line in text.splitlines()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EvalSetError(f"--prompts {path}: {e}") from None
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise EvalSetError(f"--prompts {path}: a .json prompt file holds a list of strings")
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise EvalSetError(f"--prompts {path}: no prompts")
    return [EvalSample(index=i, shard=-1, key=f"prompt-{i:05d}", variant="prompt", caption=p)
            for i, p in enumerate(prompts[:n])]


def _shard_id(url: str) -> int:
    stem = Path(url).stem
    if not stem.isdigit():
        raise EvalSetError(f"{url}: not a kiln shard (its name is not a shard id like 000123.tar)")
    return int(stem)


def choose_samples(
    manifest: Manifest, manifest_path: str | os.PathLike[str], n: int, *, seed: int = 0,
    variant: str | None = None,
) -> list[EvalSample]:
    """``n`` samples (all of them if the manifest has fewer), chosen and captioned as above."""
    if n < 1:
        raise EvalSetError(f"the evaluation set needs at least 1 sample, got {n}")
    urls = shard_urls(manifest, manifest_path)
    listed: list[tuple[int, str]] = []  # (position in the manifest's shard list, key)
    # Each sample once: a merged manifest may list a dataset's shards several times (its repeat),
    # and two datasets may share images; the first listing is the one used.
    seen: set[str] = set()
    read: set[tuple[str, str | None]] = set()
    firsts = []  # (position, entry, url) of each shard's first listing with its subset
    for pos, (entry, url) in enumerate(zip(manifest.shards, urls, strict=True)):
        listing = (url, entry.subset.mask if entry.subset is not None else None)
        if listing in read:
            continue  # a repeated part's shard, listed again: its samples are all seen
        read.add(listing)
        if url.startswith("pipe:"):
            raise EvalSetError(f"{url}: evaluation reads files and URLs, not pipes")
        firsts.append((pos, entry, url))

    def accepted_keys(url: str) -> list[str]:
        index = index_of(url)
        if not storage.is_file(index):
            raise EvalSetError(f"{url}: no index beside it ({posixpath.basename(index)})")
        table = read_index(index, columns=["key", "status"])
        return table.filter(table["status"] == OK)["key"].to_list()

    distinct = list(dict.fromkeys(url for _, _, url in firsts))
    keys_of = dict(zip(distinct, storage.parallel_map(accepted_keys, distinct, any(map(storage.is_remote, distinct))),
                       strict=True))  # URLs: many indexes at a time
    for pos, entry, url in firsts:
        accepted = keys_of[url]
        if len(accepted) != entry.accepted:
            raise EvalSetError(f"{url}: its index lists {len(accepted)} accepted samples but the manifest says "
                               f"{entry.accepted}: the shard changed after the manifest was written")
        # A subset's samples only (curate manifest --where ...).
        for key in (accepted[i] for i in entry.positions()):
            if key not in seen:
                seen.add(key)
                listed.append((pos, key))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(listed))[:n]
    chosen = [listed[i] for i in order]

    wanted: dict[int, dict[str, int]] = {}  # shard position -> key -> evaluation index
    for i, (pos, key) in enumerate(chosen):
        wanted.setdefault(pos, {})[key] = i
    samples: list[EvalSample | None] = [None] * len(chosen)
    selections, part_of = part_captions(manifest), shard_parts(manifest)
    for pos, keys in sorted(wanted.items()):
        weights = {variant: 1.0} if variant else selections[part_of[pos]]
        # Only the captions are read, the latents seeked over: 10,000 samples drawn from a
        # million touch every shard, and reading whole shards would read every latent.
        def caption_member(k: str, ext: str, picked: frozenset[str] = frozenset(keys)) -> bool:
            return k in picked and _is_caption_member(ext)

        for key, members in _read_samples(urls[pos], keys, caption_member):
            i = keys.pop(key)
            texts = {ext[: -len(".txt")]: data.decode("utf-8") for ext, data in members.items()
                     if ext.endswith(".txt")}
            accepted = json.loads(members["json"]).get("captions") if "json" in members else None
            caption_rng = np.random.default_rng(_key_seed(seed, key))
            name, text, _ = choose_caption(weights, texts, accepted, caption_rng)
            samples[i] = EvalSample(i, _shard_id(urls[pos]), key, name, text, part_of[pos])
        if keys:
            raise EvalSetError(f"{urls[pos]}: the index lists {len(keys)} sample(s) the tar lacks "
                               f"(first: {next(iter(keys))}): the shard changed after indexing")
    found = [s for s in samples if s is not None]
    if variant and found and not any(s.variant == variant for s in found):
        used = sorted({s.variant for s in found if s.variant})
        raise EvalSetError(f"--captions {variant}: no sample drawn has a {variant} caption (they have "
                           f"{', '.join(used) or 'none'})")
    return found


def _read_samples(tar: str, keys: Collection[str], wanted: Callable[[str, str], bool]
                  ) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The samples of ``keys`` (their ``wanted`` members) in the tar's order: a local tar walked,
    seeking over the rest; a URL's samples read where its index locates them (consecutive ones in
    one request, curate.shards.owned_samples)."""
    if not storage.is_remote(tar):
        yield from iter_tar_samples(tar, wanted)
        return
    try:
        for key, members in owned_samples(tar, lambda i, k: k in keys, wanted):
            if members:
                yield key, members
    except ShardError as e:
        raise EvalSetError(str(e)) from None


def _is_caption_member(ext: str) -> bool:
    return ext == "json" or ext.endswith(".txt")


def _key_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8).digest(), "little")


def images_dir_of(manifest: Manifest, override: str | os.PathLike[str] | None = None) -> list[Path | str]:
    """The image stage the manifest's latents were encoded from (its provenance; one per part of a
    merged manifest; a folder or a URL), or ``override``."""
    try:
        return image_stages(manifest, override, option="--images")
    except ManifestError as e:
        raise EvalSetError(str(e)) from None


def real_images(
    samples: list[EvalSample], images_dir: Path | str | list[Path | str], resolution: int, *, batch_size: int = 64,
    threads: int = 4,
) -> Iterator[torch.Tensor]:
    """The samples' original images as uint8 batches [B, 3, resolution, resolution], decoded and
    cropped in ``threads`` threads (PIL releases the GIL while it decodes and resizes), in the
    order of the image shards (not of ``samples``: see :func:`real_batches`).
    ``images_dir``: the image stage, or one per part of a merged manifest (:func:`images_dir_of`)."""
    for _, batch in real_batches(samples, images_dir, resolution, batch_size=batch_size, threads=threads):
        yield batch


def real_batches(
    samples: list[EvalSample], images_dir: Path | str | list[Path | str], resolution: int, *, batch_size: int = 64,
    threads: int = 4,
) -> Iterator[tuple[list[EvalSample], torch.Tensor]]:
    """:func:`real_images` with each batch's samples: what pairs an image with its prompt."""
    stages = images_dir if isinstance(images_dir, list) else [images_dir]
    by_shard: dict[tuple[int, int], dict[str, EvalSample]] = {}
    for s in samples:
        by_shard.setdefault((s.part, s.shard), {})[s.key] = s

    def originals() -> Iterator[tuple[EvalSample, bytes]]:
        for (part, shard), picked in sorted(by_shard.items()):
            tar = storage.join(stages[part], f"{shard_name(shard)}.tar")
            if not storage.is_file(tar):
                raise EvalSetError(f"{tar}: the image shard of latent shard {shard} is missing")
            missing = set(picked)
            for key, members in _read_samples(tar, picked, lambda k, ext, keys=picked: k in keys and ext == IMAGE_MEMBER):
                missing.discard(key)
                yield picked[key], members[IMAGE_MEMBER]
            if missing:
                raise EvalSetError(f"{tar} lacks {len(missing)} sample(s) of the latents "
                                   f"(first: {sorted(missing)[0]}): the image stage changed")

    def crop(data: bytes) -> torch.Tensor:
        return preprocess(data, resolution=resolution)[0]

    # Executor.map would read every original ahead (all of them in memory): one batch at a time.
    pending = originals()
    with ThreadPoolExecutor(threads) as pool:
        while chunk := list(itertools.islice(pending, batch_size)):
            yield [s for s, _ in chunk], torch.stack(list(pool.map(crop, [data for _, data in chunk])))
