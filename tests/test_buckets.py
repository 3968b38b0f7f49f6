"""Preprocessing of encode-latents: bucket tables, assignment, crop records, odd image modes,
the ordered shard loader and batching by bucket."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.utils.data as tud
from PIL import Image

from curate.buckets import (
    ShardImageLoader,
    assign_bucket,
    batch_by_bucket,
    gather_batch,
    make_buckets,
    preprocess,
    resize_and_crop,
    to_model_range,
)
from curate.runner import CurateError


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def smooth_image(w: int, h: int, seed: int = 0) -> Image.Image:
    """Upsampled noise: content at every scale, but smooth enough to compare resamplings."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((12, 16, 3)) * 255).astype(np.uint8))
    return coarse.resize((w, h), Image.Resampling.BICUBIC)


def marker_image(w: int, h: int, x0: int, y0: int, size: int) -> Image.Image:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[y0:y0 + size, x0:x0 + size] = 255
    return Image.fromarray(arr)


# EXIF orientation -> the transpose that stores an upright image so that it displays upright.
INVERSE_OF_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                          4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                          6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
                          8: Image.Transpose.ROTATE_270}


def centroid(pixels: np.ndarray) -> tuple[float, float]:
    """(x, y) of the brightness-weighted centre of an HxW array."""
    weights = pixels.astype(np.float64)
    ys, xs = np.indices(weights.shape)
    return float((xs * weights).sum() / weights.sum()), float((ys * weights).sum() / weights.sum())


def expected_centre(record: dict, x: float, y: float) -> tuple[float, float]:
    """Where original pixel coordinate (x, y) lands in the output, from the record's crop box."""
    left, top, right, bottom = record["crop_box"]
    th, tw = record["target_size"]
    # Pixel centres: output pixel j covers [j, j + 1) of the output grid.
    return (x - left) * tw / (right - left) - 0.5, (y - top) * th / (bottom - top) - 0.5


# -- bucket table ---------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution,multiple", [(256, 16), (512, 16), (1024, 16), (512, 32), (1024, 64)])
def test_bucket_table_properties(resolution: int, multiple: int) -> None:
    buckets = make_buckets(resolution, multiple)
    area = resolution * resolution
    assert (resolution, resolution) in buckets
    assert len(set(buckets)) == len(buckets)
    ratios = [h / w for h, w in buckets]
    assert ratios == sorted(ratios)
    for h, w in buckets:
        assert h % multiple == 0 and w % multiple == 0
        assert 0.95 * area <= h * w <= 1.05 * area, (h, w)
        assert (w, h) in buckets  # portrait and landscape alike
        assert 1 / 4.0 - 1e-9 <= h / w <= 4.0 + 1e-9
    # Coverage: the extremes reach about 1:4 and 4:1, and no aspect ratio is far from a bucket.
    assert ratios[0] <= 1 / 3.5 and ratios[-1] >= 3.5
    gaps = np.diff(np.log(ratios))
    assert gaps.max() < 0.35


def test_bucket_table_options_and_errors() -> None:
    assert all(1 / 2 <= h / w <= 2 for h, w in make_buckets(512, 16, max_aspect=2.0))
    assert make_buckets(256, 16, max_aspect=1.0) == [(256, 256)]
    with pytest.raises(ValueError, match="multiple of 16"):
        make_buckets(250, 16)
    with pytest.raises(ValueError):
        make_buckets(256, 16, max_aspect=0.5)


@pytest.mark.parametrize("size,expect", [
    ((500, 500), (256, 256)),  # square
    ((10_000, 100), (128, 512)),  # beyond the widest bucket: the widest
    ((100, 10_000), (512, 128)),
])
def test_assign_bucket_fixed_cases(size: tuple[int, int], expect: tuple[int, int]) -> None:
    assert assign_bucket(*size, make_buckets(256, 16)) == expect


def test_assign_bucket_is_nearest_in_log_aspect() -> None:
    buckets = make_buckets(256, 16)
    landscape = assign_bucket(1920, 1080, buckets)
    portrait = assign_bucket(1080, 1920, buckets)
    assert landscape[1] > landscape[0] and portrait == landscape[::-1]
    assert assign_bucket(768, 1024, buckets)[0] > assign_bucket(768, 1024, buckets)[1]
    rng = np.random.default_rng(0)
    for w, h in rng.integers(16, 5000, size=(200, 2)):
        got = assign_bucket(int(w), int(h), buckets)
        best = min(abs(math.log(bh / bw) - math.log(h / w)) for bh, bw in buckets)
        assert abs(math.log(got[0] / got[1]) - math.log(h / w)) == pytest.approx(best)


# -- resize and crop ------------------------------------------------------------------------------


@pytest.mark.parametrize("size,target", [
    ((640, 480), (224, 288)),  # landscape into a landscape bucket
    ((300, 900), (448, 144)),  # portrait
    ((50, 40), (256, 256)),  # upscale
    ((2000, 1000), (160, 416)),  # big downscale: reduce() then Lanczos
    ((1000, 1000), (128, 512)),  # square into an extreme bucket: most of the height goes
])
def test_resize_and_crop_box_is_right(size: tuple[int, int], target: tuple[int, int]) -> None:
    w, h = size
    img = smooth_image(w, h)
    out, record = resize_and_crop(img, target)
    assert out.size == (target[1], target[0]) and out.mode == "RGB"
    assert record["orig_size"] == [w, h] and record["target_size"] == list(target)
    left, top, right, bottom = record["crop_box"]
    assert 0 <= left <= right <= w and 0 <= top <= bottom <= h
    assert (right - left) / (bottom - top) == pytest.approx(target[1] / target[0], rel=1e-3)
    assert left == pytest.approx(w - right, abs=0.01) and top == pytest.approx(h - bottom, abs=0.01)
    rw, rh = record["resized_size"]
    assert (rw == target[1] and rh >= target[0]) or (rh == target[0] and rw >= target[1])
    # Cropping the original with the box and resizing gives the same picture.
    reference = img.crop(tuple(round(v) for v in record["crop_box"])).resize(
        out.size, Image.Resampling.LANCZOS)
    diff = np.abs(np.asarray(out, np.float64) - np.asarray(reference, np.float64))
    assert diff.mean() < 3.0
    # And a marker lands where the box says, within a pixel.
    x0, y0, s = int(w * 0.55), int(h * 0.4), max(4, min(w, h) // 10)
    marked, record = resize_and_crop(marker_image(w, h, x0, y0, s), target)
    cx, cy = centroid(np.asarray(marked)[..., 0])
    ex, ey = expected_centre(record, x0 + s / 2, y0 + s / 2)
    assert abs(cx - ex) < 1.0 and abs(cy - ey) < 1.0


@pytest.mark.parametrize("draft", [False, True])
def test_preprocess_big_jpeg_crop_box_with_and_without_draft(draft: bool) -> None:
    w, h, x0, y0, s = 1600, 1200, 1000, 500, 120
    data = encode(marker_image(w, h, x0, y0, s), "JPEG", quality=95)
    tensor, record = preprocess(data, resolution=64, buckets=None, draft=draft)
    assert tensor.shape == (3, 64, 64) and tensor.dtype == torch.uint8
    assert record["crop_box"] == [200.0, 0.0, 1400.0, 1200.0]
    cx, cy = centroid(tensor[0].numpy())
    ex, ey = expected_centre(record, x0 + s / 2, y0 + s / 2)
    assert abs(cx - ex) < 1.0 and abs(cy - ey) < 1.0


@pytest.mark.parametrize("orientation", range(1, 9))
def test_draft_decoding_of_an_exif_rotated_jpeg_keeps_the_crop_in_place(orientation: int) -> None:
    # Sides that are not multiples of the draft's scale (4 here): the last drafted pixel is partial,
    # and the orientations that reverse an axis put it first on that axis.
    w, h, x0, y0, s = 1017, 761, 600, 350, 80
    shown = marker_image(w, h, x0, y0, s)
    stored = shown.transpose(INVERSE_OF_ORIENTATION[orientation]) if orientation > 1 else shown
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, "JPEG", quality=95, exif=exif)
    centres = {}
    for draft in (False, True):
        tensor, record = preprocess(data, resolution=64, buckets=None, draft=draft)
        assert record["orig_size"] == [w, h]
        centres[draft] = centroid(tensor[0].numpy())
    assert np.abs(np.subtract(centres[True], centres[False])).max() < 0.1, centres


def test_draft_decoding_matches_full_decoding() -> None:
    data = encode(smooth_image(2400, 1800), "JPEG", quality=92)
    buckets = make_buckets(256, 16)
    full, r1 = preprocess(data, resolution=256, buckets=buckets, draft=False)
    fast, r2 = preprocess(data, resolution=256, buckets=buckets, draft=True)
    assert r1 == r2 and full.shape == fast.shape == (3, 224, 288)
    assert (full.float() - fast.float()).abs().mean() < 1.0


# -- odd inputs ------------------------------------------------------------------------------------


def rgb_at(tensor: torch.Tensor, y: int, x: int) -> np.ndarray:
    return tensor[:, y, x].numpy().astype(int)


def test_exif_rotated_jpeg_is_displayed_upright() -> None:
    # Stored landscape: left half red, right half blue. Orientation 6 = turn 90 degrees
    # clockwise to display: a portrait image, red on top.
    arr = np.zeros((600, 1200, 3), np.uint8)
    arr[:, :600] = (255, 0, 0)
    arr[:, 600:] = (0, 0, 255)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6
    data = encode(img, "JPEG", quality=95, exif=exif.tobytes())
    buckets = make_buckets(64, 16)
    for draft in (False, True):
        tensor, record = preprocess(data, resolution=64, buckets=buckets, draft=draft)
        assert record["orig_size"] == [600, 1200] and record["target_size"] == [80, 48]
        assert record["crop_box"] == [0.0, 100.0, 600.0, 1100.0]
        assert tensor.shape == (3, 80, 48)
        assert np.abs(rgb_at(tensor, 10, 24) - (255, 0, 0)).max() < 12
        assert np.abs(rgb_at(tensor, 70, 24) - (0, 0, 255)).max() < 12


def malformed_exif(orientation: int) -> bytes:
    """An EXIF block as some writers leave them: an orientation, and TransferFunction (a SHORT tag)
    written as ASCII. PIL reads it, but cannot write it back."""
    import struct

    entries = [struct.pack("<HHI2sH", 0x0112, 3, 1, struct.pack("<H", orientation), 0),
               struct.pack("<HHI4s", 301, 2, 4, b"abc\0")]
    return (b"Exif\0\0II*\0" + struct.pack("<IH", 8, len(entries)) + b"".join(entries)
            + struct.pack("<I", 0))


def test_a_malformed_exif_block_does_not_reject_a_rotated_image() -> None:
    # Ingest accepts the image (its pixels decode); every later stage must display it upright too,
    # not fail on PIL rewriting the EXIF block.
    from curate.images import check_image

    arr = np.zeros((60, 120, 3), np.uint8)
    arr[:, :60] = (255, 0, 0)
    arr[:, 60:] = (0, 0, 255)
    data = encode(Image.fromarray(arr), "JPEG", quality=95, exif=malformed_exif(6))
    for phash in (False, True):
        check = check_image(data, min_side=16, phash=phash)
        assert check.reason is None and (check.width, check.height, check.orientation) == (60, 120, 6)
    tensor, record = preprocess(data, resolution=64, buckets=make_buckets(64, 16))
    assert record["orig_size"] == [60, 120] and tensor.shape == (3, 80, 48)
    assert np.abs(rgb_at(tensor, 10, 24) - (255, 0, 0)).max() < 12
    assert np.abs(rgb_at(tensor, 70, 24) - (0, 0, 255)).max() < 12


@pytest.mark.parametrize("compression", [None, "tiff_deflate"])  # PIL's own decoder, and libtiff
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_rotated_tiff_is_sized_and_displayed_upright(orientation: int, compression: str | None) -> None:
    # PIL >= 13 opens a TIFF at its displayed size already (and turns it as it loads): the size
    # must not be turned a second time, in ingest's index or in the crop.
    from curate.images import check_image

    arr = np.zeros((60, 120, 3), np.uint8)  # displayed: red left, blue right, green bottom-right
    arr[:, :60] = (255, 0, 0)
    arr[:, 60:] = (0, 0, 255)
    arr[30:, 90:] = (0, 255, 0)
    shown = Image.fromarray(arr)
    stored = shown.transpose(INVERSE_OF_ORIENTATION[orientation]) if orientation > 1 else shown
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, "TIFF", exif=exif, **({"compression": compression} if compression else {}))
    check = check_image(data, min_side=16)
    assert check.reason is None and (check.width, check.height) == (120, 60)
    tensor, record = preprocess(data, resolution=64, buckets=make_buckets(64, 16))
    assert record["orig_size"] == [120, 60] and tensor.shape == (3, 48, 80)
    assert np.abs(rgb_at(tensor, 10, 10) - (255, 0, 0)).max() < 12
    assert np.abs(rgb_at(tensor, 10, 60) - (0, 0, 255)).max() < 12
    assert np.abs(rgb_at(tensor, 40, 75) - (0, 255, 0)).max() < 12


def test_rgba_transparency_becomes_white() -> None:
    arr = np.zeros((64, 64, 4), np.uint8)
    arr[:, 32:] = (255, 0, 0, 255)  # left half: transparent black
    tensor, _ = preprocess(encode(Image.fromarray(arr, "RGBA"), "PNG"), resolution=64, buckets=None)
    assert tensor.shape == (3, 64, 64) and tensor.dtype == torch.uint8
    assert rgb_at(tensor, 32, 8).tolist() == [255, 255, 255]
    assert rgb_at(tensor, 32, 56).tolist() == [255, 0, 0]


@pytest.mark.parametrize("mode,key,kept", [("RGB", (0, 0, 0), (255, 0, 0)), ("L", 0, (200, 200, 200)),
                                           ("I;16", 0, (200, 200, 200)), ("1", 0, (255, 255, 255))])
def test_transparent_colour_of_a_grey_or_rgb_png_becomes_white(mode: str, key, kept: tuple) -> None:
    # PNG's tRNS chunk makes one colour of a grey or truecolour image transparent (a viewer shows
    # the page through it), as a palette entry is in a palette image.
    fill = {"RGB": (255, 0, 0), "L": 200, "I;16": 51400, "1": 1}[mode]
    img = Image.new(mode, (64, 64), fill)
    img.paste(key, (0, 0, 32, 64))  # left half: the transparent colour
    tensor, _ = preprocess(encode(img, "PNG", transparency=key), resolution=64, buckets=None)
    assert rgb_at(tensor, 32, 8).tolist() == [255, 255, 255]
    assert np.abs(rgb_at(tensor, 32, 56) - kept).max() <= 1
    opaque, _ = preprocess(encode(img, "PNG"), resolution=64, buckets=None)
    assert rgb_at(opaque, 32, 8).tolist() == [0, 0, 0]


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_is_converted(fmt: str) -> None:
    img = Image.new("CMYK", (80, 80), (0, 255, 255, 0))  # no cyan, full magenta and yellow: red
    tensor, _ = preprocess(encode(img, fmt), resolution=64, buckets=None)
    assert tensor.shape == (3, 64, 64)
    assert np.abs(rgb_at(tensor, 32, 32) - (255, 0, 0)).max() < 6


def test_16_bit_grey_is_scaled_not_clipped() -> None:
    img = Image.fromarray(np.full((70, 90), 51400, np.uint16))  # 51400 / 65535 * 255 = 200
    assert img.mode.startswith("I")
    tensor, _ = preprocess(encode(img, "PNG"), resolution=64, buckets=None)
    assert tensor.shape == (3, 64, 64)
    assert np.abs(rgb_at(tensor, 32, 32) - 200).max() <= 1


def test_palette_and_transparent_palette() -> None:
    img = Image.new("P", (64, 64), 1)
    img.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)  # index 1: green
    img.paste(0, (0, 0, 32, 64))  # left half: index 0, the transparent colour
    plain, _ = preprocess(encode(img, "PNG"), resolution=64, buckets=None)
    assert rgb_at(plain, 32, 56).tolist() == [0, 200, 0] and rgb_at(plain, 32, 8).tolist() == [0, 0, 0]
    transparent, _ = preprocess(encode(img, "PNG", transparency=0), resolution=64, buckets=None)
    assert rgb_at(transparent, 32, 8).tolist() == [255, 255, 255]
    assert rgb_at(transparent, 32, 56).tolist() == [0, 200, 0]


def test_animated_gif_uses_first_frame() -> None:
    frames = [Image.new("RGB", (96, 64), c).convert("P") for c in [(255, 0, 0), (0, 0, 255)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    tensor, record = preprocess(data, resolution=64, buckets=make_buckets(64, 16))
    assert record["target_size"] == [48, 80] and tensor.shape == (3, 48, 80)
    assert np.abs(rgb_at(tensor, 24, 40) - (255, 0, 0)).max() < 8


@pytest.mark.parametrize("data", [b"", b"definitely not an image", encode(smooth_image(64, 64), "PNG")[:200]])
def test_undecodable_data_raises_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        preprocess(data, resolution=64, buckets=None)


def test_images_that_ingest_let_in_above_pils_own_limit_decode(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # `curate ingest --max-pixels` above twice PIL's default (179 MP) lets bigger images in; the
    # stages that decode them after (in a process where PIL's default applies) must not refuse
    # them as decompression bombs. Scaled down here: PIL's limit 1000 pixels, the image 4096.
    from curate.images import ImageStream

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = encode(smooth_image(64, 64), "PNG")
    tensor, _ = preprocess(data, resolution=32, buckets=None)
    assert tensor.shape == (3, 32, 32)
    tar = write_tar(tmp_path / "000000.tar", [("k0", {"jpg": data})])
    stream = ImageStream([(0, tar)], lambda image: image.size, workers=0)
    assert list(stream.take(0, 1)) == [("k0", (64, 64), None)]
    stream.close()
    assert Image.MAX_IMAGE_PIXELS == 1000  # lifted while decoding only


def test_to_model_range() -> None:
    pixels = torch.tensor([0, 255, 128], dtype=torch.uint8)
    out = to_model_range(pixels)
    assert out.dtype == torch.float32 and out[0] == -1 and out[1] == 1 and abs(out[2]) < 0.01


# -- the loader ------------------------------------------------------------------------------------


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> str:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, blob in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    return str(path)


@pytest.fixture
def three_shards(tmp_path: Path) -> list[tuple[int, str]]:
    sizes = [(96, 64), (64, 96), (80, 80), (200, 50), (64, 64), (120, 90), (50, 150)]
    shards = []
    for shard_id, count in [(3, 5), (7, 4), (9, 6)]:
        samples = []
        for i in range(count):
            key = f"s{shard_id}k{i}"
            w, h = sizes[(shard_id + i) % len(sizes)]
            fmt = "PNG" if i % 2 else "JPEG"
            members = {"jpg": encode(smooth_image(w, h, seed=shard_id * 10 + i), fmt),
                       "json": json.dumps({"key": key}).encode(), "txt": b"a caption"}
            if (shard_id, i) == (7, 1):
                members["jpg"] = b"not an image at all"
            if (shard_id, i) == (7, 2):
                del members["jpg"]
            samples.append((key, members))
        shards.append((shard_id, write_tar(tmp_path / f"{shard_id:06d}.tar", samples)))
    return shards


def collect(loader: ShardImageLoader) -> list[tuple]:
    with loader:
        return list(loader)


def same(a: list[tuple], b: list[tuple]) -> None:
    assert [(s, k, r) for s, k, _, r in a] == [(s, k, r) for s, k, _, r in b]
    for (_, _, ta, _), (_, _, tb, _) in zip(a, b, strict=True):
        assert (ta is None and tb is None) or torch.equal(ta, tb)


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_loader_order_and_content_with_0_and_2_workers(three_shards: list[tuple[int, str]]) -> None:
    buckets = make_buckets(64, 16)
    sequential = []
    for shard_id, tar in three_shards:
        with tarfile.open(tar) as t:
            names = t.getnames()
            keys = list(dict.fromkeys(n.split(".")[0] for n in names))
            for key in keys:
                if f"{key}.jpg" not in names:
                    sequential.append((shard_id, key, None, {"error": "no jpg member in the sample"}))
                    continue
                data = t.extractfile(f"{key}.jpg").read()
                try:
                    tensor, record = preprocess(data, resolution=64, buckets=buckets)
                    sequential.append((shard_id, key, tensor, record))
                except ValueError as e:
                    sequential.append((shard_id, key, None, {"error": str(e)}))
    assert len(sequential) == 15
    # Chunks of 1 and 2 samples cross shard ends at every place; 16 holds a whole shard.
    for workers, chunk in [(0, 16), (2, 1), (2, 2), (3, 2), (2, 16)]:
        got = collect(ShardImageLoader(three_shards, resolution=64, buckets=buckets, workers=workers, chunk=chunk))
        same(got, sequential)
    errors = [(k, r["error"]) for _, k, t, r in sequential if t is None]
    assert [k for k, _ in errors] == ["s7k1", "s7k2"] and "cannot decode" in errors[0][1]
    assert {tuple(t.shape) for _, _, t, _ in sequential if t is not None} > {(3, 64, 64)}


def test_loader_skips_keys_without_decoding_them(three_shards: list[tuple[int, str]]) -> None:
    skip = {7: {"s7k0", "s7k1"}, 9: {"s9k5"}}  # s7k1 is undecodable: skipped, not an error
    only = {3: {"s3k2"}}
    for workers, chunk in [(0, 16), (2, 2)]:
        got = collect(ShardImageLoader(three_shards, resolution=64, workers=workers, skip_keys=skip,
                                       only_keys=only, chunk=chunk))
        assert [k for _, k, _, _ in got] == [f"s{s}k{i}" for s, n in [(3, 5), (7, 4), (9, 6)] for i in range(n)]
        skipped = [k for _, k, t, r in got if r == {"skipped": True} and t is None]
        assert skipped == ["s3k0", "s3k1", "s3k3", "s3k4", "s7k0", "s7k1", "s9k5"]
        assert [k for _, k, t, r in got if "error" in r] == ["s7k2"]
        assert all(t.shape == (3, 64, 64) for _, _, t, _ in got if t is not None)


def test_loader_says_what_to_do_when_shared_memory_runs_out(three_shards: list[tuple[int, str]],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def full(_):  # what torch raises in the main process when a worker cannot share a chunk
        raise RuntimeError("Caught RuntimeError in DataLoader worker process 0.\n"
                           "RuntimeError: unable to write to file </torch_1_2_3>: No space left on device (28)")
        yield

    monkeypatch.setattr(tud.DataLoader, "__iter__", full)
    with ShardImageLoader(three_shards, resolution=64, workers=2) as loader:
        with pytest.raises(CurateError, match=r"out of shared memory \(/dev/shm\).*--shm-size"):
            list(loader.take(3, 5))
    # recaption's and score's stream of images says the same.
    from curate.images import ImageStream

    stream = ImageStream(three_shards, lambda image: image, workers=2)
    with pytest.raises(CurateError, match=r"out of shared memory \(/dev/shm\).*--shm-size"):
        list(stream.take(3, 5))
    stream.close()


def test_loader_take_checks_shard_boundaries(three_shards: list[tuple[int, str]]) -> None:
    with ShardImageLoader(three_shards, resolution=64, workers=2) as loader:
        for shard_id, count in [(3, 5), (7, 4), (9, 6)]:
            keys = [k for k, _, _ in loader.take(shard_id, count)]
            assert keys == [f"s{shard_id}k{i}" for i in range(count)]
    with ShardImageLoader(three_shards, resolution=64, workers=0) as loader:
        with pytest.raises(CurateError, match="shard 3 holds fewer samples"):
            list(loader.take(3, 6))
    with ShardImageLoader(three_shards[:1], resolution=64, workers=0) as loader:
        with pytest.raises(CurateError, match="fewer samples"):
            list(loader.take(3, 7))


# -- batching --------------------------------------------------------------------------------------


def test_gather_batch_stacks_and_pads_with_the_last_image() -> None:
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 4, 6), dtype=torch.uint8, generator=g) for _ in range(3)]
    assert torch.equal(gather_batch(images), torch.stack(images))
    padded = gather_batch(images, rows=5)
    assert padded.shape == (5, 3, 4, 6) and padded.dtype == torch.uint8
    assert torch.equal(padded[:3], torch.stack(images))
    assert torch.equal(padded[3], images[2]) and torch.equal(padded[4], images[2])
    images[0][:] = 0  # a copy: the batch does not alias its images
    assert not torch.equal(padded[0], images[0])


def test_batch_by_bucket_groups_by_shape() -> None:
    shapes = {"a": (3, 32, 64), "b": (3, 64, 32), "c": (3, 48, 48)}
    order = ["a1", "b1", "a2", "a3", "b2", "c1", "a4", "a5", "a6"]
    items = [(k, torch.zeros(shapes[k[0]], dtype=torch.uint8), {"i": i}) for i, k in enumerate(order)]
    batches = [[k for k, _, _ in batch] for batch in batch_by_bucket(iter(items), 2)]
    assert batches == [["a1", "a2"], ["b1", "b2"], ["a3", "a4"], ["a5", "a6"], ["c1"]]
    batches = [[k for k, _, _ in batch] for batch in batch_by_bucket(items, 4)]
    assert batches == [["a1", "a2", "a3", "a4"], ["a5", "a6"], ["b1", "b2"], ["c1"]]
    assert list(batch_by_bucket([], 4)) == []
    with pytest.raises(ValueError):
        list(batch_by_bucket(items, 0))
