"""The frozen text encoder: captions -> (embeddings, mask), exactly as ``PRXPipeline`` encodes prompts.

The denoiser must see prompts during training the way the exported pipeline will show them, so
:meth:`TextEncoder.encode` repeats ``PRXPipeline._encode_prompt_standard`` step by step: diffusers'
own ``TextPreprocessor().clean_text`` (imported, not copied: DeepFloyd's cleaning, which among
other things lowercases and strips URLs), the tokenizer with ``padding="max_length"``,
``truncation=True`` and ``max_length = max_tokens`` (an export writes ``max_tokens`` as the
tokenizer's ``model_max_length``, which is what the pipeline pads to), then the encoder's
``last_hidden_state``. The pipeline also asks for ``output_hidden_states``; the last hidden state
is the same without it, so we skip keeping every layer's output.

A dropped caption (classifier-free guidance) is the empty string ``""``: its embedding is exactly
what ``PRXPipeline`` uses as the unconditional branch (its default ``negative_prompt`` is ``""``).
Note that ``""`` is not all padding: Gemma's tokenizer still emits ``<bos>``, so the mask has one
valid token and attention over the text is well defined.

The encoder is T5Gemma's encoder half (``T5GemmaEncoder``, what ``PRXPipeline`` takes as
``text_encoder``). Accepted checkpoints, by alias (``t5gemma``), local folder or Hub id:

- a full encoder-decoder T5Gemma (``google/t5gemma-2b-2b-ul2``, weights ``model.encoder.*`` and
  ``model.decoder.*``): only the encoder's weights are loaded, as PRX uses it
  (``T5GemmaModel.from_pretrained(...).encoder``) without materialising the decoder;
- an encoder-only ``T5GemmaEncoderModel`` save (weights ``encoder.*``);
- a bare ``T5GemmaEncoder`` save (weights without prefix, composite or module config), e.g. a
  PRX pipeline's ``text_encoder/`` folder, our exports' and ``curate.tiny.build_tiny_t5gemma``;
- a PRX pipeline folder or repository (``model_index.json`` with ``text_encoder/`` and
  ``tokenizer/``): its text encoder and tokenizer.

Weights load from safetensors only (checkpoints are data, never code). The model is frozen
(``eval``, ``requires_grad_(False)``), bf16 on CUDA and fp32 on CPU unless ``dtype`` says otherwise.

Cleaning costs about 65 us for a 50-character caption and 260 us for a 370-character one (one
CPU core, ftfy 6.3), nine tenths of it the ~40 regular expressions, the rest ftfy; a 256-caption
batch of long captions spends ~65 ms cleaning. Callers that encode in a hot loop can clean in data-loader workers with
:func:`clean_caption` and call ``encode(..., clean=False)``.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from curate.models import resolve_model
from curate.runner import CurateError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from transformers.models.t5gemma.modeling_t5gemma import T5GemmaEncoder

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "EncodedPrompts",
    "TextEncoder",
    "TextEncoderError",
    "clean_caption",
    "quiet_transformers",
]

DEFAULT_MAX_TOKENS = 256  # PRX's tokenizer model_max_length

# What a Hub download fetches: a T5Gemma checkpoint's config, safetensors weights and tokenizer at
# the root, or a PRX pipeline's text_encoder/ and tokenizer/ (never its transformer or VAE).
_HUB_PATTERNS = [
    "model_index.json",
    "config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "text_encoder/*",
    "tokenizer/*",
]
# Where the encoder's token embedding sits in each accepted layout (see the module docstring).
_EMBEDDING_KEYS = {
    "embed_tokens.weight": "",
    "encoder.embed_tokens.weight": "encoder.",
    "model.encoder.embed_tokens.weight": "model.encoder.",
}


class TextEncoderError(CurateError, ValueError):
    """A text encoder that cannot be found, loaded or used; the message names it."""


@functools.cache
def _preprocessor() -> Any:
    """diffusers' ``TextPreprocessor``, the one ``PRXPipeline`` cleans prompts with.

    Its ``clean_text`` calls ``ftfy.fix_text``, and diffusers imports ftfy only when it is
    installed: without it the pipeline itself fails on every prompt with a NameError. Say so here.
    """
    from diffusers.pipelines.prx import pipeline_prx

    if getattr(pipeline_prx, "ftfy", None) is None:
        raise TextEncoderError(
            "PRX prompt cleaning (diffusers' TextPreprocessor.clean_text, which PRXPipeline runs on "
            "every prompt) needs the ftfy package: pip install ftfy")
    return pipeline_prx.TextPreprocessor()


def clean_caption(text: str) -> str:
    """``PRXPipeline``'s prompt cleaning (diffusers' ``TextPreprocessor().clean_text``)."""
    return _preprocessor().clean_text(text)


@dataclass(eq=False)
class TextEncoder:
    """A frozen T5Gemma encoder plus its tokenizer; :meth:`encode` turns captions into context."""

    model: T5GemmaEncoder
    tokenizer: PreTrainedTokenizerBase
    name: str  # as the user named it: alias, folder or Hub id
    id: str  # resolved Hub id or absolute folder
    revision: str | None  # the Hub commit loaded, None for a local folder
    max_tokens: int
    device: torch.device

    @property
    def dim(self) -> int:
        """Hidden size of the embeddings: the denoiser's ``context_in_dim``."""
        return int(self.model.config.hidden_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @classmethod
    def load(
        cls,
        name: str,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | Literal["auto"] | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        revision: str | None = None,
    ) -> TextEncoder:
        """Load an alias (``t5gemma``), a local folder or a Hub id (at ``revision``).

        ``dtype``: None gives bf16 on CUDA and fp32 elsewhere; ``"auto"`` keeps the checkpoint's.
        """
        if max_tokens < 1:
            raise TextEncoderError(f"max_tokens must be positive, got {max_tokens}")
        try:
            ref = resolve_model(name, "text", revision)
        except CurateError as e:
            raise TextEncoderError(f"text encoder: {e}") from e
        _preprocessor()  # fail before a multi-gigabyte load, not at the first batch
        device = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        root, commit = (Path(ref.id), None) if ref.local else _download(name, ref.id, revision)
        encoder_dir, tokenizer_dir = _layout(root)
        model = _load_encoder(name, encoder_dir, dtype)
        tokenizer = _load_tokenizer(name, tokenizer_dir)
        model.to(device).eval().requires_grad_(False)
        return cls(model=model, tokenizer=tokenizer, name=name, id=ref.id, revision=commit,
                   max_tokens=max_tokens, device=device)

    @staticmethod
    def describe(name: str, revision: str | None = None) -> tuple[str, str | None, int] | None:
        """(resolved id, Hub commit or None, hidden size) from the checkpoint's config, without
        loading its weights; None when the config does not say the hidden size."""
        ref = resolve_model(name, "text")
        root, commit = (Path(ref.id), None) if ref.local else _download(name, ref.id, revision)
        try:
            raw = json.loads((_layout(root)[0] / "config.json").read_text())
        except (OSError, ValueError):
            return None
        hidden = (raw.get("encoder") or raw).get("hidden_size")  # a composite config's encoder, or a module's
        return (ref.id, commit, int(hidden)) if isinstance(hidden, int) else None

    def clean(self, captions: Sequence[str]) -> list[str]:
        """The captions as ``PRXPipeline`` would feed them to the tokenizer."""
        preprocessor = _preprocessor()
        return [preprocessor.clean_text(c) for c in captions]

    def tokenize(
        self, captions: Sequence[str], *, clean: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids [B, max_tokens] long, mask [B, max_tokens] bool), on the encoder's device."""
        texts = self.clean(captions) if clean else [str(c) for c in captions]
        tokens = self.tokenizer(texts, padding="max_length", max_length=self.max_tokens,
                                truncation=True, return_attention_mask=True, return_tensors="pt")
        return self._on_device(tokens["input_ids"], tokens["attention_mask"].bool())

    def _on_device(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device.type == "cuda":  # from pinned memory the copy does not wait for the GPU
            return (ids.pin_memory().to(self.device, non_blocking=True),
                    mask.pin_memory().to(self.device, non_blocking=True))
        return ids, mask

    def tokenize_ids(self, texts: Sequence[str]) -> tuple[list[list[int]], list[bool]]:
        """Unpadded token ids of cleaned captions, truncated at ``max_tokens`` as :meth:`tokenize`
        truncates them, and whether each one was cut."""
        if not texts:
            return [], []
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_tokens, padding=False,
                             return_attention_mask=False)["input_ids"]
        full = [i for i, row in enumerate(ids) if len(row) >= self.max_tokens]
        cut = [False] * len(ids)
        if full:
            whole = self.tokenizer([texts[i] for i in full], truncation=False, padding=False,
                                   return_attention_mask=False)["input_ids"]
            for i, row in zip(full, whole, strict=True):
                cut[i] = len(row) > self.max_tokens
        return ids, cut

    def encode_ids(self, ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """The embeddings of each caption's tokens (from :meth:`tokenize_ids`), ``[len(ids[i]), dim]``
        in the encoder's dtype on its device: what :meth:`encode` gives at the unmasked positions.

        A right-padding tokenizer pads the batch to its longest caption only: a token's position
        (RoPE) and the bidirectional mask make its embedding independent of the padding after it.
        A left-padding one shifts every position by the padding, so it pads to ``max_tokens``
        exactly as :meth:`tokenize` does.
        """
        if not ids:
            return []
        right = self.tokenizer.padding_side == "right"
        padded = self.tokenizer.pad({"input_ids": [list(i) for i in ids]},
                                    padding="longest" if right else "max_length", max_length=self.max_tokens,
                                    return_attention_mask=True, return_tensors="pt")
        tokens, mask = self._on_device(padded["input_ids"], padded["attention_mask"].bool())
        with torch.no_grad():
            hidden = self.model(input_ids=tokens, attention_mask=mask).last_hidden_state
        return [hidden[i][mask[i]] for i in range(len(ids))]

    def encode(
        self, captions: Sequence[str], *, clean: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings [B, max_tokens, dim] float32, mask [B, max_tokens] bool), no gradients.

        A dropped caption is ``""`` (the pipeline's unconditional prompt). ``clean=False`` skips
        the cleaning for captions already passed through :func:`clean_caption`.
        """
        if isinstance(captions, str):
            raise TypeError("encode takes a list of captions, not one string")
        if not captions:
            return (torch.empty(0, self.max_tokens, self.dim, device=self.device),
                    torch.empty(0, self.max_tokens, dtype=torch.bool, device=self.device))
        ids, mask = self.tokenize(captions, clean=clean)
        with torch.no_grad():
            out = self.model(input_ids=ids, attention_mask=mask)
        return out.last_hidden_state.float(), mask


class EncodedPrompts:
    """A few fixed prompts' embeddings, kept from a :class:`TextEncoder` that can then be released.

    Training on stored caption embeddings (``curate encode-text``) needs the encoder only for the
    empty prompt (dropped captions, the unconditional branch) and the sample grids' prompts:
    encoding those once at the start frees the encoder's memory (5 GB of bf16 for T5Gemma-2B's)
    for the whole run. :meth:`encode` serves exactly those prompts, as the encoder would.
    """

    def __init__(self, encoder: TextEncoder, prompts: Sequence[str]):
        self.name, self.id, self.revision = encoder.name, encoder.id, encoder.revision
        self.max_tokens, self.device, self.dim = encoder.max_tokens, encoder.device, encoder.dim
        unique = list(dict.fromkeys(["", *prompts]))
        context, mask = encoder.encode(unique)
        self._cache = {p: (context[i], mask[i]) for i, p in enumerate(unique)}

    def encode(self, captions: Sequence[str], *, clean: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`TextEncoder.encode`, for the prompts given at construction only."""
        if isinstance(captions, str):
            raise TypeError("encode takes a list of captions, not one string")
        unknown = [c for c in captions if c not in self._cache]
        if unknown:
            raise TextEncoderError(f"prompt {unknown[0]!r} was not encoded before the text encoder "
                                   f"{self.name!r} was released")
        rows = [self._cache[c] for c in captions]
        if not rows:
            return (torch.empty(0, self.max_tokens, self.dim, device=self.device),
                    torch.empty(0, self.max_tokens, dtype=torch.bool, device=self.device))
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


# --------------------------------------------------------------------------- loading


def _download(name: str, repo: str, revision: str | None) -> tuple[Path, str]:
    """A Hub checkpoint's text-encoder files in the local cache; (folder, commit)."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo, revision=revision, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # network, auth (T5Gemma is gated), missing repo or revision
        raise TextEncoderError(f"text encoder {name!r}: cannot fetch {repo}"
                               f"{f' at {revision}' if revision else ''} from the Hub: {e}") from e
    return path, path.name  # snapshots/<commit>


def _layout(root: Path) -> tuple[Path, Path]:
    """(encoder folder, tokenizer folder): a pipeline's subfolders, else the folder itself."""
    if (root / "text_encoder" / "config.json").is_file():
        tokenizer = root / "tokenizer"
        return root / "text_encoder", tokenizer if tokenizer.is_dir() else root
    return root, root


def _weight_names(name: str, folder: Path) -> list[str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return list(json.loads(index.read_text())["weight_map"])
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise TextEncoderError(f"text encoder {name!r}: no safetensors weights in {folder} "
                               "(pickled checkpoints are not loaded)")
    from safetensors import safe_open

    names: list[str] = []
    for file in files:
        with safe_open(file, framework="pt") as f:  # reads the header only
            names.extend(f.keys())
    return names


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' load reports and progress bars: a full T5Gemma's decoder weights are
    left unused on purpose, and the loader checks for missing weights itself."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def _load_encoder(name: str, folder: Path, dtype: torch.dtype | str) -> T5GemmaEncoder:
    from transformers import T5GemmaConfig, T5GemmaEncoderModel, T5GemmaModuleConfig
    from transformers.models.t5gemma.modeling_t5gemma import T5GemmaEncoder

    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise TextEncoderError(f"text encoder {name!r}: cannot read {folder / 'config.json'}: {e}") from e
    model_type = raw.get("model_type")
    if model_type not in ("t5gemma", "t5_gemma_module"):
        raise TextEncoderError(f"text encoder {name!r} is a {model_type!r} model; PRX conditions on "
                               "T5Gemma's encoder (model_type t5gemma or t5_gemma_module)")
    names = set(_weight_names(name, folder))
    prefix = next((p for key, p in _EMBEDDING_KEYS.items() if key in names), None)
    if prefix is None:
        raise TextEncoderError(f"text encoder {name!r}: {folder} holds no T5Gemma encoder weights "
                               f"(none of {', '.join(_EMBEDDING_KEYS)})")
    with quiet_transformers():
        if model_type == "t5_gemma_module":
            module_config = T5GemmaModuleConfig.from_pretrained(folder)
            composite = None
        else:
            composite = T5GemmaConfig.from_pretrained(folder)
            module_config = composite.encoder
        if prefix == "":
            model, info = T5GemmaEncoder.from_pretrained(
                folder, config=module_config, dtype=dtype, use_safetensors=True,
                output_loading_info=True)
        else:
            if composite is None:
                raise TextEncoderError(f"text encoder {name!r}: weights named {prefix}* need a "
                                       "T5Gemma (encoder-decoder) config")
            # Encoder-only: the decoder's weights (half of a 2B-2B checkpoint) are never built.
            composite.is_encoder_decoder = False
            wrapper, info = T5GemmaEncoderModel.from_pretrained(
                folder, config=composite, dtype=dtype, use_safetensors=True,
                output_loading_info=True)
            model = wrapper.encoder
    wrong = sorted(info.get("missing_keys", [])) + sorted(str(m) for m in info.get("mismatched_keys", []))
    if wrong:
        # transformers only warns and leaves such weights random: a silently random encoder.
        raise TextEncoderError(f"text encoder {name!r}: weights missing from {folder} or of the "
                               f"wrong shape: {', '.join(wrong[:5])}")
    return model


def _load_tokenizer(name: str, folder: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise TextEncoderError(f"text encoder {name!r}: cannot load its tokenizer from {folder}: "
                               f"{e}") from e
