"""Shared fixtures: image folders with good and bad files, built in a few milliseconds."""

from __future__ import annotations

import io
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from curate.shards import committed_shards, iter_tar_samples

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs a worker per core: one thread each, and in the processes the tests start,
    # or every worker's torch runs a thread per core and they crowd each other out (2 workers
    # with a thread per core were 1.35x slower than with one).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _staging_of_the_test_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """What stages and runs at URLs stage locally ($KILN_STAGING, by default the system's temporary
    folder) goes to a folder of the test run, not /tmp (a test may set its own, as machines do)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KILN_STAGING", str(tmp_path_factory.mktemp("staging")))
        yield


def noise_image(seed: int, size: tuple[int, int] = (96, 80), mode: str = "RGB") -> Image.Image:
    """Random pixels: every seed gives different bytes, so no accidental duplicates."""
    rng = np.random.default_rng(seed)
    w, h = size
    arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    return Image.fromarray(arr).convert(mode) if mode != "RGB" else Image.fromarray(arr)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but whose data is tiny (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def write_good_images(root: Path, n: int, start_seed: int = 0, size=(96, 80)) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = root / f"good_{start_seed + i:04d}.jpg"
        p.write_bytes(encode(noise_image(start_seed + i, size), "JPEG", quality=80))
        paths.append(p)
    return paths


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    """Good, unusual-but-valid and bad images, with sidecar captions; the expected counts are in the test."""
    root = tmp_path / "src"
    (root / "nested" / "deeper").mkdir(parents=True)
    good = noise_image(1)
    (root / "a_rgb.jpg").write_bytes(encode(good, "JPEG"))
    (root / "a_rgb.txt").write_text("a photo of noise\n")
    (root / "b_png.png").write_bytes(encode(noise_image(2), "PNG"))
    (root / "b_png.json").write_text('{"caption": "json caption", "license": "cc0"}')
    (root / "nested" / "c.webp").write_bytes(encode(noise_image(3), "WEBP"))
    (root / "nested" / "d.bmp").write_bytes(encode(noise_image(4), "BMP"))
    (root / "nested" / "deeper" / "e.tiff").write_bytes(encode(noise_image(5), "TIFF"))
    (root / "f_cmyk.jpg").write_bytes(encode(noise_image(6, mode="CMYK"), "JPEG"))
    (root / "g_rgba.png").write_bytes(encode(noise_image(7, mode="RGBA"), "PNG"))
    (root / "h_palette.png").write_bytes(encode(noise_image(8, mode="P"), "PNG"))
    sixteen = Image.fromarray((np.random.default_rng(9).random((80, 96)) * 65535).astype(np.uint16))
    (root / "i_16bit.png").write_bytes(encode(sixteen, "PNG"))
    frames = [noise_image(10 + k, mode="P") for k in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    (root / "j_animated.gif").write_bytes(buf.getvalue())
    rotated = noise_image(13, size=(120, 70))
    exif = Image.Exif()
    exif[0x0112] = 6
    (root / "k_rotated.jpg").write_bytes(encode(rotated, "JPEG", exif=exif.tobytes()))
    # bad ones
    (root / "bad_empty.jpg").write_bytes(b"")
    jpeg = encode(noise_image(14, size=(200, 160)), "JPEG")
    (root / "bad_truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "bad_text.png").write_text("this is not an image")
    (root / "bad_tiny.png").write_bytes(encode(noise_image(15, size=(40, 30)), "PNG"))
    (root / "bad_bomb.png").write_bytes(png_header_only(30000, 30000))
    (root / "z_duplicate.jpg").write_bytes((root / "a_rgb.jpg").read_bytes())
    (root / "notes.md").write_text("not an image extension: ignored")
    return root


def run_cli(*args: str, check: bool = True, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """The `curate` command as a user runs it, in a subprocess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "curate", *args], capture_output=True, text=True,
                          env=full_env, cwd=REPO, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"curate {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def snapshot(stage_dir: Path) -> dict:
    """Everything a consumer can observe of a stage output: tar bytes and index rows per shard."""
    out = {}
    for shard in committed_shards(stage_dir):
        rows = pl.read_parquet(shard.index_path).to_dicts()
        tar = shard.tar_path.read_bytes() if shard.tar_path else None
        out[shard.shard_id] = (tar, rows, shard.meta.counts, shard.meta.depends_on)
    return out


def samples(stage_dir: Path) -> dict[str, dict[str, bytes]]:
    out = {}
    for shard in committed_shards(stage_dir):
        for key, members in iter_tar_samples(shard.tar_path):
            assert key not in out, f"key {key} is in two shards"
            out[key] = members
    return out


def kill_at(args: list[str], stage_dir: Path, committed: tuple[int, ...], env: dict | None = None,
            check: Callable[[Path], None] | None = None, timeout: float = 120.0) -> int:
    """Run `curate ARGS` once per entry of ``committed``, SIGKILLing the whole job (workers
    included, as a preemption does) once that many shards are committed; returns the kills.

    ``check`` runs on the stage folder after each kill (what a reader could see then).
    """
    kills = 0
    for count in committed:
        proc = subprocess.Popen([sys.executable, "-m", "curate", *args], cwd=REPO, env={**os.environ, **(env or {})},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None and len(list(stage_dir.glob("*.parquet"))) < count:
            time.sleep(0.002)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        if check is not None:
            check(stage_dir)
    return kills


@pytest.fixture
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's
    spinning threads slow them down many times over (a 32-token generate: 7.5 s, not 0.17 s)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def s3_bucket(monkeypatch) -> str:
    """An empty bucket of a real S3 API server on 127.0.0.1 (moto's), reached through s3fs as a
    user's `s3://` URLs are: returns ``s3://BUCKET``. The endpoint and fake credentials are in the
    environment, for the test's subprocesses too."""
    import boto3
    from moto.server import ThreadedMotoServer
    from s3fs import S3FileSystem

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for name, value in {"AWS_ACCESS_KEY_ID": "kiln", "AWS_SECRET_ACCESS_KEY": "kiln", "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
        monkeypatch.setenv(name, value)
    boto3.client("s3").create_bucket(Bucket="kiln-test")
    S3FileSystem.clear_instance_cache()  # fsspec keeps one per arguments, not per endpoint
    try:
        yield "s3://kiln-test"
    finally:
        S3FileSystem.clear_instance_cache()
        server.stop()


def download(url: str, to: Path) -> Path:
    """A folder at a URL copied here (to look at what a stage wrote there)."""
    from fsspec.core import url_to_fs

    fs, inner = url_to_fs(url)
    fs.get(inner.rstrip("/") + "/", str(to), recursive=True)
    return to
