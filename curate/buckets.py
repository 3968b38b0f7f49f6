"""Preprocessing of the encode-latents stage: decode, orient, resize, crop, and batch by shape.

Runs in DataLoader worker processes (``ShardImageLoader``), so that decoding and resizing
overlap with encoding on the device.

- Without buckets every image becomes ``resolution x resolution``: the short side is resized
  to ``resolution`` (antialiased) and the centre is cropped.
- With buckets (``make_buckets``) every image goes to the bucket, a (height, width) of about
  ``resolution**2`` pixels, whose aspect ratio is closest to its own (``assign_bucket``); it is
  resized to cover the bucket and the centre cropped, so little of the image is lost.

Every processed image comes with a record of what was done to it, kept with the latent:
``{"orig_size": [w, h], "resized_size": [w, h], "crop_box": [left, top, right, bottom],
"target_size": [h, w]}``. ``orig_size`` is as displayed (after EXIF orientation), and
``crop_box`` is in those original pixel coordinates: the part of the original that the
latent shows. That is what SDXL-style size and crop conditioning needs, and what tells a
user which part of an image was kept.

Tensors leave the workers as **uint8, CHW, RGB**: the image is 8-bit anyway, so nothing is
lost, and a uint8 tensor is 4x smaller than float32 in the workers' shared memory and the
batches the stage stacks. The stage converts a stacked batch on the device with
``to_model_range`` (uint8 [0, 255] -> float [-1, 1], what diffusers VAEs expect).
"""

from __future__ import annotations

import dataclasses
import math
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.utils.data as tud
from PIL import Image, UnidentifiedImageError

from curate.images import (
    _orientation,
    displayed_size,
    open_image,
    out_of_shared_memory,
    stage_pixel_limit,
    to_rgb,
)
from curate.procs import die_with_parent
from curate.runner import CurateError
from curate.shards import split_member

# The image stage stores the original bytes under KEY.jpg whatever the real format.
IMAGE_MEMBER = "jpg"

# A bucket's area may exceed resolution**2 by at most this much: a bigger latent than the
# square one would cost memory the user did not plan for. Below it, the nearest grid point wins.
MAX_AREA_EXCESS = 0.05

# Lanczos runs on an image at most this many times the target size; above it PIL first
# shrinks by an integer factor with a box filter (``Image.reduce``): fast, antialiased, and
# with 3.0 indistinguishable from Lanczos all the way (PIL's documentation).
REDUCING_GAP = 3.0
# JPEGs are decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, ``Image.draft``) when
# the result stays at least this many times the size needed; decoding is most of the cost of
# a big JPEG, and PIL's own ``thumbnail`` uses the same margin of 2 by default.
DRAFT_GAP = 2.0
# EXIF orientation -> whether the displayed image's x and y axes run against the stored image's.
_REVERSED_AXES = {2: (True, False), 3: (True, True), 4: (False, True), 6: (True, False), 7: (True, True),
                  8: (False, True)}


# -- buckets --------------------------------------------------------------------------------------


def make_buckets(resolution: int, multiple: int, *, max_aspect: float = 4.0) -> list[tuple[int, int]]:
    """Aspect-ratio buckets (height, width) of about ``resolution**2`` pixels.

    Both sides are multiples of ``multiple`` (the VAE's downsampling times the denoiser's
    patch size: 8 * 2 = 16 for Flux latents and a 2x2-patch transformer), and the aspect
    ratios run from ``1/max_aspect`` to ``max_aspect``. For every short side on the grid the
    long side is the grid point that brings the area closest to ``resolution**2`` without
    exceeding it by more than 5% (kohya/SDXL tables round down instead, which loses up to
    ``multiple/short`` of the area: 12% for 256 px buckets at 4:1). Sorted by aspect ratio
    (height / width), landscape first; the square ``(resolution, resolution)`` is always there.
    """
    if resolution <= 0 or multiple <= 0:
        raise ValueError(f"resolution ({resolution}) and multiple ({multiple}) must be positive")
    if resolution % multiple:
        raise ValueError(f"resolution {resolution} is not a multiple of {multiple} "
                         "(the VAE downsampling times the patch size)")
    if max_aspect < 1.0:
        raise ValueError(f"max_aspect must be >= 1, got {max_aspect}")
    side = resolution // multiple  # in grid units; the target area is side**2 units
    area = side * side
    buckets = {(resolution, resolution)}
    for short in range(1, side):
        long = round(area / short)
        if long * short > area * (1 + MAX_AREA_EXCESS):
            long -= 1
        if long / short > max_aspect * (1 + 1e-9):
            continue
        buckets.add((short * multiple, long * multiple))
        buckets.add((long * multiple, short * multiple))
    return sorted(buckets, key=lambda hw: (hw[0] / hw[1], hw[0]))


def assign_bucket(width: int, height: int, buckets: Iterable[tuple[int, int]]) -> tuple[int, int]:
    """The bucket (height, width) whose aspect ratio is closest to the image's, in log space.

    Log space makes 2:1 and 1:2 equally far from 1:1, so landscape and portrait images are
    treated alike; ties go to the first bucket in the given order.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    ratio = math.log(height / width)
    best, best_distance = None, math.inf
    for bh, bw in buckets:
        distance = abs(math.log(bh / bw) - ratio)
        if distance < best_distance:
            best, best_distance = (int(bh), int(bw)), distance
    if best is None:
        raise ValueError("no buckets to choose from")
    return best


# -- resize and crop ------------------------------------------------------------------------------


def crop_record(width: int, height: int, target_hw: tuple[int, int]) -> tuple[tuple[float, ...], dict]:
    """The centred box of a ``width x height`` image that, scaled, exactly covers ``target_hw``.

    Returns the box (float original pixel coordinates) and the record kept with the sample.
    The scale is the one that makes the image cover the target: one side matches the target
    exactly, the other is cropped equally on both ends.
    """
    th, tw = target_hw
    scale = max(tw / width, th / height)
    crop_w, crop_h = min(width, tw / scale), min(height, th / scale)  # min: float noise at equality
    left, top = (width - crop_w) / 2, (height - crop_h) / 2
    box = (left, top, left + crop_w, top + crop_h)
    record = {
        "orig_size": [int(width), int(height)],
        "resized_size": [max(tw, round(width * scale)), max(th, round(height * scale))],
        "crop_box": [round(v, 2) for v in box],
        "target_size": [int(th), int(tw)],
    }
    return box, record


def _resize_box(img: Image.Image, target_hw: tuple[int, int], box: tuple[float, ...]) -> Image.Image:
    # Resampling the box straight to the target is the same as resizing the whole image and
    # cropping, without sub-pixel rounding of the crop and without resampling pixels that
    # are then thrown away.
    th, tw = target_hw
    return img.resize((tw, th), Image.Resampling.LANCZOS, box=box, reducing_gap=REDUCING_GAP)


def resize_and_crop(img: Image.Image, target_hw: tuple[int, int]) -> tuple[Image.Image, dict]:
    """Resize ``img`` (antialiased Lanczos) to cover ``target_hw`` (height, width), crop the centre.

    Returns the ``target_hw`` image and its record (see the module docstring); the record's
    ``crop_box`` is in ``img``'s pixel coordinates, rounded to 0.01.
    """
    box, record = crop_record(img.width, img.height, target_hw)
    return _resize_box(img, target_hw, box), record


def to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a uint8 tensor [3, H, W] (contiguous, ready for shared memory)."""
    # One copy, HWC -> CHW; it also makes the array writable (PIL's buffer is read-only).
    return torch.from_numpy(np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)))


def gather_batch(images: list[torch.Tensor], rows: int | None = None, pin_memory: bool = False) -> torch.Tensor:
    """``images`` (uint8, one shape) stacked into one new [rows, ...] tensor, ``rows`` at least
    ``len(images)``; the rows past them repeat the last image (padding for a compiled encoder).

    numpy copies in the calling thread. torch's stack would split each copy across its OpenMP
    threads, which then spin waiting for the next parallel region on cores the decoding
    workers need (BENCHMARKS.md, encode latents, session 5).
    """
    rows = rows or len(images)
    batch = torch.empty((rows, *images[0].shape), dtype=torch.uint8, pin_memory=pin_memory)
    out = batch.numpy()
    np.stack([t.numpy() for t in images], out=out[: len(images)])
    out[len(images):] = out[len(images) - 1]
    return batch


def to_model_range(pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels [0, 255] as float in [-1, 1], the VAE's input range; run it on the device."""
    return pixels.to(dtype).div_(127.5).sub_(1.0)


def preprocess(
    data: bytes,
    *,
    resolution: int,
    buckets: list[tuple[int, int]] | None = None,
    draft: bool = True,
) -> tuple[torch.Tensor, dict]:
    """Original image bytes -> (uint8 tensor [3, H, W], record), as the encode-latents stage needs.

    The first frame of an animation is used; ``to_rgb`` applies EXIF orientation, composites
    transparency on white and converts CMYK, 16-bit and palette images. Without ``buckets``
    the result is ``resolution x resolution`` (short side resized, centre cropped); with them,
    the image's bucket. Big JPEGs are decoded at a reduced scale first when ``draft`` (see
    ``DRAFT_GAP``); the record is in original pixel coordinates either way.
    Raises ValueError (with the decoder's message) when the bytes cannot be decoded.
    """
    if not data:
        raise ValueError("empty image data")
    try:
        with stage_pixel_limit(), open_image(data) as img:  # the pixel limit applied at ingest
            stored_w, stored_h = img.size
            width, height = displayed_size(img)
            target = assign_bucket(width, height, buckets) if buckets else (resolution, resolution)
            box, record = crop_record(width, height, target)
            shrink, orientation = 1.0, _orientation(img)
            if draft and img.format == "JPEG":
                scale = max(target[1] / width, target[0] / height)
                need = (math.ceil(stored_w * scale * DRAFT_GAP), math.ceil(stored_h * scale * DRAFT_GAP))
                drafted = img.draft(None, need)
                if drafted is not None:
                    shrink = stored_w / drafted[1][2]  # 1, 2, 4 or 8
            img.load()
            rgb = to_rgb(img)
    except MemoryError:
        raise
    except UnidentifiedImageError as e:
        # PIL's message names the BytesIO's address: it would make the index differ run to run.
        raise ValueError("cannot decode image: no image format recognised") from e
    except Exception as e:  # whatever the decoder raises, the stage records it as a rejection
        raise ValueError(f"cannot decode image: {type(e).__name__}: {e}"[:300]) from e
    # A drafted pixel i covers stored pixels [i * shrink, (i + 1) * shrink): the box scales
    # exactly, and stays inside the real content (the last drafted pixel may be partial). On a
    # displayed axis that the EXIF orientation reverses, that partial pixel comes first: the box
    # moves by what it lacks.
    left, top, right, bottom = (v / shrink for v in box)
    reversed_x, reversed_y = _REVERSED_AXES.get(orientation, (False, False))
    dx = rgb.width - width / shrink if reversed_x else 0.0
    dy = rgb.height - height / shrink if reversed_y else 0.0
    out = _resize_box(rgb, target, (left + dx, top + dy, min(right + dx, rgb.width), min(bottom + dy, rgb.height)))
    return to_tensor(out), record


# -- loading shards in workers --------------------------------------------------------------------


def _iter_samples(tar_path: str, wanted: Callable[[int, str], bool]) -> Iterator[tuple[str, bytes | None]]:
    """(key, image bytes or None) for every sample of a tar, in order; bytes only when wanted.

    ``wanted(i, key)`` is asked once per sample (i counts samples from 0). Every worker walks
    every tar, but the bytes of samples it does not own are seeked over, never read; a tar at a
    URL is not walked: its index locates the wanted samples, each run of them fetched in one request
    (curate.shards.owned_samples).
    """
    from curate import storage
    from curate.shards import owned_samples

    if storage.is_remote(tar_path):
        for key, members in owned_samples(tar_path, wanted, lambda k, ext: ext == IMAGE_MEMBER):
            yield key, None if members is None else members.get(IMAGE_MEMBER)
        return
    with tarfile.open(tar_path, mode="r:") as tar:
        key: str | None = None
        image: bytes | None = None
        want, i = False, -1
        for info in tar:
            if not info.isfile():
                continue
            k, ext = split_member(info.name)
            if k != key:
                if key is not None:
                    yield key, image
                i += 1
                key, image, want = k, None, wanted(i, k)
            if want and ext == IMAGE_MEMBER:
                image = tar.extractfile(info).read()
        if key is not None:
            yield key, image


# Consecutive samples a worker decodes and sends as one message: their pixels travel in one
# shared-memory buffer, one file descriptor per chunk. One message per image (arrays through
# the worker's pipe) cost the main process 1.17 ms of CPU per 256 px image on 2 cores, most of
# it reading the pipe; see BENCHMARKS.md for the figure with chunks. With 2 chunks ahead per
# worker, 8 workers hold 256 images ahead: 50 MB of shared memory at 256 px, 800 MB at 1024.
CHUNK = 16
CHUNKS_AHEAD = 2


@dataclasses.dataclass
class _Chunk:
    """Consecutive samples of one shard, as a worker sends them: ``pixels`` holds every decoded
    image, flattened one after the other; ``places[i]`` is sample i's (offset, shape) in it,
    None for a sample that has no image (its record says why)."""

    shard_id: int
    keys: list[str]
    records: list[dict]
    places: list[tuple[int, tuple[int, int, int]] | None]
    pixels: torch.Tensor

    def items(self) -> Iterator[tuple[int, str, torch.Tensor | None, dict]]:
        for key, record, place in zip(self.keys, self.records, self.places, strict=True):
            if place is None:
                yield self.shard_id, key, None, record
            else:
                # A copy, not a view: an image that waits long for a batch of its bucket would
                # otherwise keep its whole chunk in shared memory (a 16th of the cost of the
                # pipe it replaces: 0.02 ms for 256 px). numpy copies in this thread, where
                # torch's copy would wake its OpenMP threads (see gather_batch).
                offset, shape = place
                image = self.pixels.numpy()[offset: offset + math.prod(shape)].reshape(shape).copy()
                yield self.shard_id, key, torch.from_numpy(image), record


def _pack(shard_id: int, decoded: list[tuple[str, torch.Tensor | None, dict]]) -> _Chunk:
    places, offset = [], 0
    for _, tensor, _ in decoded:
        places.append(None if tensor is None else (offset, tuple(tensor.shape)))
        offset += 0 if tensor is None else tensor.numel()
    pixels = torch.empty(offset, dtype=torch.uint8)
    if offset:
        torch.cat([t.reshape(-1) for _, t, _ in decoded if t is not None], out=pixels)
    return _Chunk(shard_id, [k for k, _, _ in decoded], [r for _, _, r in decoded], places, pixels)


class _ShardSamples(tud.IterableDataset):
    """The samples of several shards in chunks of ``chunk`` consecutive samples of one shard;
    counting chunks across shards, worker w of n decodes chunk c when c % n == w."""

    def __init__(self, shards: list[tuple[int, str]], resolution: int, buckets: list[tuple[int, int]] | None,
                 skip_keys: Mapping[int, set[str]], only_keys: Mapping[int, set[str]] | None, draft: bool,
                 chunk: int):
        self.shards, self.resolution, self.buckets = shards, resolution, buckets
        self.skip_keys, self.only_keys, self.draft, self.chunk = skip_keys, only_keys, draft, chunk

    def _skipped(self, shard_id: int, key: str) -> bool:
        if key in self.skip_keys.get(shard_id, ()):
            return True
        return self.only_keys is not None and shard_id in self.only_keys and key not in self.only_keys[shard_id]

    def _decode(self, shard_id: int, key: str, data: bytes | None) -> tuple[str, torch.Tensor | None, dict]:
        if self._skipped(shard_id, key):
            return key, None, {"skipped": True}
        if data is None:
            return key, None, {"error": f"no {IMAGE_MEMBER} member in the sample"}
        try:
            return key, *preprocess(data, resolution=self.resolution, buckets=self.buckets, draft=self.draft)
        except Exception as e:  # validated at ingest; a failure here is a rejection
            message = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            return key, None, {"error": message[:300]}

    def __iter__(self) -> Iterator[_Chunk]:
        info = tud.get_worker_info()
        wid, n = (info.id, info.num_workers) if info is not None else (0, 1)
        first_chunk = 0  # the global number of this shard's first chunk
        for shard_id, tar in self.shards:
            def mine(i: int, first_chunk: int = first_chunk) -> bool:
                return (first_chunk + i // self.chunk) % n == wid

            def wanted(i: int, key: str, shard_id: int = shard_id) -> bool:
                return mine(i) and not self._skipped(shard_id, key)

            count, decoded = 0, []
            for i, (key, data) in enumerate(_iter_samples(tar, wanted)):
                count += 1
                if mine(i):
                    decoded.append(self._decode(shard_id, key, data))
                    if i % self.chunk == self.chunk - 1:
                        yield _pack(shard_id, decoded)
                        decoded = []
            if decoded:  # the shard's last chunk, shorter
                yield _pack(shard_id, decoded)
            first_chunk += -(-count // self.chunk)


def _identity(item: Any) -> Any:  # module level: picklable under the spawn/forkserver start methods
    return item


class ShardImageLoader:
    """Preprocessed images of several image shards, in exactly the shards' order.

    Iterating gives ``(shard_id, key, tensor, record)`` for every sample of every shard, shard
    after shard; ``take(shard_id, count)`` gives the next ``count`` as ``(key, tensor, record)``
    and checks they belong to that shard. ``tensor`` is uint8 [3, H, W] (see ``preprocess``);
    when it is None, ``record`` says why:
    ``{"skipped": True}`` for a key the caller asked to skip (never read nor decoded, e.g. no
    accepted caption), ``{"error": "..."}`` for bytes that could not be decoded.

    ``workers`` DataLoader processes decode ahead (0: in this process), ``chunk`` consecutive
    samples of a shard at a time. Chunk c (counted across shards) goes to worker c % workers,
    and the DataLoader takes from the workers in turn, so the stream comes out in input order
    whatever the number of workers (``curate.images.ImageStream``'s idea).

    ``skip_keys[shard_id]`` are keys to skip; ``only_keys[shard_id]``, the other way round,
    the only keys to decode in that shard (shards absent from ``only_keys`` are decoded whole).
    """

    def __init__(
        self,
        shards: list[tuple[int, str]],
        *,
        resolution: int,
        buckets: list[tuple[int, int]] | None = None,
        workers: int = 2,
        skip_keys: Mapping[int, set[str]] | None = None,
        only_keys: Mapping[int, set[str]] | None = None,
        chunk: int = CHUNK,
        draft: bool = True,
    ):
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        dataset = _ShardSamples([(int(s), str(t)) for s, t in shards], resolution, buckets,
                                dict(skip_keys or {}), None if only_keys is None else dict(only_keys), draft,
                                chunk)
        self.loader = tud.DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_identity,
                                     prefetch_factor=CHUNKS_AHEAD if workers else None,
                                     worker_init_fn=die_with_parent)
        self._items: Iterator | None = self._flatten(iter(self.loader))

    @staticmethod
    def _flatten(chunks: Iterator[_Chunk]) -> Iterator[tuple[int, str, torch.Tensor | None, dict]]:
        try:
            for chunk in chunks:
                yield from chunk.items()
        except RuntimeError as e:
            clear = out_of_shared_memory(e)
            if clear is None:
                raise
            raise clear from e

    def __iter__(self) -> Iterator[tuple[int, str, torch.Tensor | None, dict]]:
        if self._items is None:
            raise CurateError("the image loader is closed")
        yield from self._items

    def take(self, shard_id: int, count: int) -> Iterator[tuple[str, torch.Tensor | None, dict]]:
        """The next ``count`` samples, which must be those of ``shard_id`` (its tar's sample count)."""
        if self._items is None:
            raise CurateError("the image loader is closed")
        for _ in range(count):
            try:
                got_shard, key, tensor, record = next(self._items)
            except StopIteration:
                raise CurateError(f"image shard {shard_id} holds fewer samples than its index lists "
                                  f"({count})") from None
            if got_shard != shard_id:
                raise CurateError(f"image shard {shard_id} holds fewer samples than its index lists ({count}); "
                                  f"the next sample belongs to shard {got_shard}")
            yield key, tensor, record

    def close(self) -> None:
        """Stop the worker processes (deleting the DataLoader's iterator shuts them down)."""
        if self._items is not None:
            self._items.close()
            self._items = None

    def __enter__(self) -> ShardImageLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- batching -------------------------------------------------------------------------------------


def batch_by_bucket(
    items: Iterable[tuple[str, torch.Tensor, dict]], batch_size: int
) -> Iterator[list[tuple[str, torch.Tensor, dict]]]:
    """Group ``(key, tensor, record)`` into batches of one tensor shape, at most ``batch_size`` each.

    A batch is yielded as soon as its bucket has ``batch_size`` items, so memory stays bounded
    when ``items`` is a lazy stream; at the end every partial group is flushed, in the order
    the groups first appeared. Within a bucket the input order is kept, but batches of
    different buckets interleave: the caller restores input order when writing (by key).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups: dict[tuple[int, ...], list[tuple[str, torch.Tensor, dict]]] = {}
    for item in items:
        shape = tuple(item[1].shape)
        group = groups.setdefault(shape, [])
        group.append(item)
        if len(group) == batch_size:
            yield group
            groups[shape] = []
    for group in groups.values():
        if group:
            yield group
