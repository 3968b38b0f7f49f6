"""Validating image bytes: every image is decoded once, and what is wrong with it gets a name.

Rejection reasons (the vocabulary shared by every source):
    empty_file       zero bytes
    not_an_image     no image format recognised in the bytes
    too_many_pixels  the header declares more than --max-pixels (refused before decoding)
    too_small        the short side, after EXIF orientation, is under --min-side
    truncated        the data ends before the image does
    corrupt          the decoder failed on the data for another reason
Accepted images keep their original bytes; flags record what is unusual about them.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import threading
import warnings
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

# .jfif and .jpe are JPEG's other names (what browsers save some JPEGs as); AVIF decodes with
# Pillow >= 11.3 and is refused with its reason by an older one, never skipped unseen.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".avif", ".bmp", ".tif", ".tiff",
                              ".gif"})

# EXIF orientations 5-8 turn the image by 90 degrees: width and height swap on display.
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}
_ORIENTATION_TAG = 0x0112

REASONS = {
    "empty_file": "zero-byte file",
    "not_an_image": "no image format recognised",
    "too_many_pixels": "declared size over --max-pixels (not decoded)",
    "too_small": "short side under --min-side",
    "truncated": "data ends before the image does",
    "corrupt": "decoder failed",
    "unreadable": "could not be read from the source",
    "download_failed": "URL could not be downloaded",
    "duplicate": "same bytes as an earlier sample",
    "near_duplicate": "perceptual hash within --near-duplicates bits of an earlier sample's",
    "filtered_out": "left out by the stage's --where, --keep, --exclude or --fraction",
}
# The reason of an image a stage leaves out on purpose (curate recaption --where ...); the stages
# after it leave it out too.
FILTERED_OUT = "filtered_out"

# pHash: the 2-D DCT of a 32x32 grey thumbnail, whose lowest 8x8 frequencies give 64 bits.
PHASH_SIDE, PHASH_LOW = 32, 8
_REDUCIBLE_MODES = {"L", "RGB", "RGBA", "LA", "CMYK"}
# EXIF orientation -> the transpose that displays the image upright (as PIL's exif_transpose).
_EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                   4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                   7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def open_image(data: bytes) -> Image.Image:
    """``data`` opened by PIL (the header read, nothing decoded yet), in any format PIL reads but
    PostScript (EPS), which PIL renders by running Ghostscript on the bytes: a program run on
    crawled data, where shards are data, never code. Raises what ``Image.open`` raises."""
    Image.init()  # registers every plugin (once), in PIL's own order of trying them
    # Read at every call: a plugin registered later (pillow-heif's HEIF) takes part too.
    return Image.open(io.BytesIO(data), formats=[f for f in Image.ID if f != "EPS"])


def sample_key(data: bytes) -> str:
    """The content-derived key of a sample: 128-bit BLAKE2b of its original bytes, in hex.

    The same bytes give the same key in every run, every stage and every worker, which is
    what makes reruns idempotent and exact duplicates detectable.
    """
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass(frozen=True)
class ImageCheck:
    """What decoding an image told us. ``reason`` is None when it is accepted."""

    reason: str | None = None
    detail: str | None = None
    width: int | None = None  # as displayed, after EXIF orientation
    height: int | None = None
    format: str | None = None  # PIL's name: JPEG, PNG, WEBP, GIF, BMP, TIFF
    mode: str | None = None  # RGB, RGBA, L, LA, P, CMYK, I;16, 1, ...
    orientation: int = 1
    animated: bool = False
    phash: int | None = None  # 64-bit perceptual hash, when asked for (ingest --near-duplicates)

    @property
    def flags(self) -> list[str]:
        """Accepted but unusual, for the index: counted in the stage totals."""
        flags = []
        if self.animated:
            flags.append("animated")  # the first frame is what later stages use
        if self.orientation != 1:
            flags.append("exif_rotated")
        if self.mode is not None and self.mode not in ("RGB", "L"):
            flags.append(f"mode_{self.mode}")
        return flags


def check_image(data: bytes, *, min_side: int = 64, max_pixels: int = 89_478_485, phash: bool = False) -> ImageCheck:
    """Decode ``data`` fully once and say whether it is a usable image, and why not; with
    ``phash``, also its :func:`perceptual_hash`."""
    if not data:
        return ImageCheck("empty_file")
    try:
        with warnings.catch_warnings():
            # We apply our own pixel limit; PIL's warning would be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = open_image(data)  # reads the header only
        with img:
            width, height = img.size
            if width * height > max_pixels:
                return ImageCheck(
                    "too_many_pixels",
                    f"{width}x{height} = {width * height} pixels > {max_pixels}",
                    width, height, img.format, img.mode,
                )
            orientation = _orientation(img)
            width, height = displayed_size(img)
            if min(width, height) < min_side:
                return ImageCheck("too_small", f"{width}x{height}, short side < {min_side}",
                                  width, height, img.format, img.mode, orientation)
            animated = bool(getattr(img, "is_animated", False))
            img.load()  # decodes every pixel of the first frame
            return ImageCheck(None, None, width, height, img.format, img.mode, orientation, animated,
                              perceptual_hash(img) if phash else None)
    except Image.DecompressionBombError as e:
        return ImageCheck("too_many_pixels", str(e))
    except UnidentifiedImageError:
        return ImageCheck("not_an_image", "no image format recognised")
    except MemoryError:
        raise
    except Exception as e:  # whatever a decoder raises on bad data (PIL's AVIF decoder: RuntimeError)
        message = str(e) or type(e).__name__
        truncated = "truncated" in message or "broken data stream" in message or isinstance(e, EOFError)
        return ImageCheck("truncated" if truncated else "corrupt", message[:300])


def displayed_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image as displayed, after its EXIF orientation, without
    decoding it."""
    width, height = img.size
    if _orientation(img) in _TRANSPOSED_ORIENTATIONS and not _opened_upright(img):
        width, height = height, width
    return width, height


def _opened_upright(img: Image.Image) -> bool:
    # PIL >= 13 opens a TIFF at its displayed size (and turns its pixels as it loads them); older
    # versions at its stored size, which the TIFF's own ImageWidth and ImageLength tags give.
    tags = getattr(img, "tag_v2", None)
    return img.format == "TIFF" and tags is not None and img.size != (tags.get(256), tags.get(257))


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
        return int(value) if 1 <= int(value) <= 8 else 1
    except Exception:  # a broken EXIF block must not reject an image that decodes
        return 1


def perceptual_hash(img: Image.Image) -> int:
    """pHash (Zauner 2010; as the imagehash package computes it): the image as displayed, in grey,
    resized to 32x32, its 2-D DCT-II, and the 8x8 lowest frequencies compared with their median.

    64 bits, as an unsigned int. Re-encoded, resized or lightly edited copies of an image land
    a few bits apart; unrelated images about 32 apart.
    """
    import numpy as np

    factor = min(img.size) // (4 * PHASH_SIDE)
    if factor > 1 and img.mode in _REDUCIBLE_MODES:
        # An integer box filter first (a copy of the full image would cost more than decoding it).
        # The orientation is applied here, the way check_image read it, and the copy's metadata
        # dropped, so that to_rgb cannot apply it a second time.
        orientation = _orientation(img)
        img = img.reduce(factor)
        img.info = {}
        if orientation in _EXIF_TRANSPOSE:
            img = img.transpose(_EXIF_TRANSPOSE[orientation])
    small = to_rgb(img).convert("L").resize((PHASH_SIDE, PHASH_SIDE), Image.Resampling.LANCZOS, reducing_gap=3.0)
    pixels = np.asarray(small, dtype=np.float64)
    n = np.arange(PHASH_SIDE)
    # DCT-II basis (without its constant factors, which scale every coefficient alike and so
    # cannot change a comparison with the median)
    basis = np.cos(np.pi * n[:PHASH_LOW, None] * (2 * n[None, :] + 1) / (2 * PHASH_SIDE))
    low = basis @ pixels @ basis.T
    bits = (low > np.median(low)).flatten()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def read_and_check(
    data: bytes | None, path: str | None, min_side: int, max_pixels: int, phash: bool = False
) -> tuple[bytes | None, str | None, ImageCheck | None, tuple[str, str] | None]:
    """Worker-side work of ingest: read the file if needed, key the bytes, decode once.

    Lives here, with no heavy imports, so that decoding processes start fast.
    Returns (data, key, check, error); error is (reason, detail) when nothing could be read.
    """
    if data is None:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            return None, None, None, ("unreadable", f"{type(e).__name__}: {e}"[:300])
    return data, sample_key(data), check_image(data, min_side=min_side, max_pixels=max_pixels, phash=phash), None


def read_and_check_batch(items: list[tuple[bytes | None, str | None]], min_side: int, max_pixels: int,
                         phash: bool = False) -> list:
    return [read_and_check(data, path, min_side, max_pixels, phash) for data, path in items]


def allow_pixels(max_pixels: int) -> None:
    """Our --max-pixels applies; PIL's own global limit must not refuse images below it."""
    Image.MAX_IMAGE_PIXELS = max(max_pixels, Image.MAX_IMAGE_PIXELS or 0)


_lifted = {"holders": 0, "limit": None}  # stage_pixel_limit's state, for threads that decode together
_lifted_lock = threading.Lock()


@contextlib.contextmanager
def stage_pixel_limit() -> Iterator[None]:
    """PIL's own pixel limit lifted while images of an image stage are opened and decoded: ingest
    refused those that declare more than its --max-pixels already, and PIL's default (an error
    above twice 89.5 MP) would refuse the bigger ones a user let in, in every stage after it.
    PIL's limit is one global: it is restored when the last thread that lifted it is done."""
    with _lifted_lock:
        if _lifted["holders"] == 0:
            _lifted["limit"], Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        _lifted["holders"] += 1
    try:
        yield
    finally:
        with _lifted_lock:
            _lifted["holders"] -= 1
            if _lifted["holders"] == 0:
                Image.MAX_IMAGE_PIXELS = _lifted["limit"]


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any decoded image as 8-bit RGB, displayed the right way up.

    EXIF orientation is applied; transparency (RGBA, LA, PA, a transparent colour of a palette,
    grey or RGB image) is composited on ``background`` (white: what a viewer shows, and what avoids the
    black fringes of dropping alpha); 16- and 32-bit images are scaled to 8 bits instead of
    clipped; CMYK goes through PIL's conversion.
    """
    import numpy as np

    img.load()  # before the orientation is read: PIL >= 13 turns a TIFF upright as it loads it
    transpose = _EXIF_TRANSPOSE.get(_orientation(img))
    # The pixels alone: PIL's ImageOps.exif_transpose also writes the EXIF block back without the
    # orientation, which raises on the malformed blocks web images carry (a tag of the wrong
    # type), so an image that decodes would be rejected, or crash ingest's perceptual hash.
    # A copy either way: the caller may close ``img``.
    img = img.transpose(transpose) if transpose is not None else img.copy()
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        grey = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
        key = img.info.get("transparency")
        if isinstance(key, int):  # PNG's tRNS chunk: the grey level that is transparent
            grey = Image.merge("LA", (grey, Image.fromarray(np.where(arr == key, 0, 255).astype(np.uint8))))
        img = grey
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        img = Image.fromarray(((arr - lo) / (hi - lo or 1.0) * 255.0 + 0.5).astype(np.uint8), mode="L")
    if img.mode in ("1", "L", "RGB", "P") and "transparency" in img.info:
        # PNG's tRNS chunk (or GIF's transparent index): a colour, grey level or palette entries
        # that are transparent, which a viewer shows as the page behind them
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img if img.mode == "RGB" else img.convert("RGB")


def fit_pixels(img: Image.Image, max_pixels: int, multiple: int = 1) -> Image.Image:
    """Downscale (never upscale) so that width * height <= max_pixels, keeping the aspect ratio."""
    w, h = img.size
    if w * h <= max_pixels:
        return img
    scale = (max_pixels / (w * h)) ** 0.5
    nw, nh = max(multiple, int(w * scale) // multiple * multiple), max(multiple, int(h * scale) // multiple * multiple)
    return img.resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=3.0)


class ImageStream:
    """The images of several shards, in order, decoded, turned to RGB and put through ``prepare``
    (a resize, a model's image processor) in DataLoader workers, ahead of the model that takes
    them: what recaption and score read the image stage with.

    Workers split the samples in chunks of ``chunk`` by their global position (chunk c goes to
    worker c % n), and the DataLoader takes a chunk from the workers in turn, so the stream comes
    out in exactly the order of the shards, shard after shard, while the workers decode ahead
    (``prefetch`` chunks each). A chunk is one message between processes and, for a tar at a URL,
    one request for its consecutive samples (a request per image would wait out the store's
    latency for every image).
    """

    def __init__(self, shards: list[tuple[int, str]], prepare: Callable[[Image.Image], Any], workers: int,
                 prefetch: int = 2, skip: Collection[str] = (), chunk: int = 8):
        import torch.utils.data as tud

        from curate import storage
        from curate.procs import die_with_parent
        from curate.shards import iter_tar_samples, owned_samples

        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")

        class Images(tud.IterableDataset):
            def __iter__(self) -> Iterator[list[tuple[int, str, Any, str | None]]]:
                info = tud.get_worker_info()
                wid, n = (info.id, info.num_workers) if info is not None else (0, 1)
                position = 0  # counts samples across shards
                items: list[tuple[int, str, Any, str | None]] = []
                for shard_id, tar in shards:
                    # A tar at a URL: this worker fetches its own samples alone, where the index puts them.
                    samples = (owned_samples(tar, lambda i, k, start=position: (start + i) // chunk % n == wid
                                             and k not in skip)
                               if storage.is_remote(tar) else iter_tar_samples(tar))
                    for key, members in samples:
                        if position // chunk % n == wid:  # a skipped key comes through undecoded, as (None, None)
                            items.append((shard_id, key, *((None, None) if key in skip
                                                           else _prepared(members, prepare))))
                            if position % chunk == chunk - 1:
                                yield items
                                items = []
                        position += 1
                if items:  # the last chunk, shorter
                    yield items

        self.loader = tud.DataLoader(Images(), batch_size=None, num_workers=workers,
                                     prefetch_factor=prefetch if workers else None, collate_fn=lambda x: x,
                                     worker_init_fn=die_with_parent)
        self.chunks = iter(self.loader)
        self.pending: collections.deque[tuple[int, str, Any, str | None]] = collections.deque()

    def take(self, shard_id: int, count: int) -> Iterator[tuple[str, Any, str | None]]:
        """The next ``count`` items, all of shard ``shard_id``: (key, prepared image or None, error or None)."""
        from curate.runner import CurateError

        for _ in range(count):
            if not self.pending:
                try:
                    self.pending.extend(next(self.chunks, ()))
                except RuntimeError as e:
                    clear = out_of_shared_memory(e)
                    if clear is None:
                        raise
                    raise clear from e
            got_shard, key, image, error = self.pending.popleft() if self.pending else (None, None, None, None)
            if got_shard != shard_id:
                raise CurateError(f"image shard {shard_id} holds fewer samples than its index lists")
            yield key, image, error

    def close(self) -> None:
        del self.chunks


def out_of_shared_memory(e: RuntimeError) -> Exception | None:
    """A clear error for a DataLoader whose workers filled /dev/shm (tensors travel through it),
    else None."""
    from curate.runner import CurateError

    if "No space left on device" in str(e) or "shared memory" in str(e):
        return CurateError("the decoding workers ran out of shared memory (/dev/shm): give the container more "
                           f"(docker run --shm-size=2g) or pass fewer --decode-workers. torch said: {e}")
    return None


def _prepared(members: dict[str, bytes], prepare: Callable[[Image.Image], Any]) -> tuple[Any, str | None]:
    try:
        with stage_pixel_limit(), open_image(members["jpg"]) as img:
            img.load()
            rgb = to_rgb(img)
        return prepare(rgb), None
    except Exception as e:  # validated at ingest; a failure here is recorded, not fatal
        return None, f"{type(e).__name__}: {e}"[:300]
