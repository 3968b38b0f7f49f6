"""Caption prompts: the shipped, versioned prompt set and users' additions to it.

A prompt set is a JSON file:

    {"version": 1,
     "variants": {"long": {"prompt": "...", "min_words": 60, "max_words": 260, "max_new_tokens": 400},
                  "short": {...}},
     "orig_caption_context": "... {orig_caption} ..."}

`curate/prompt_sets/default.json` ships with the package; each `--prompts FILE` is read after
it, and its variants add to or replace the shipped ones. A plain `.txt` file is one variant
named after the file's stem, its whole text the prompt. Every caption records its variant's
`PromptSpec.hash`, so a dataset says exactly which prompt wrote each caption.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

DEFAULT_VARIANTS: tuple[str, ...] = ("long", "short")

log = logging.getLogger("curate")
ORIG_CAPTION_FIELD = "{orig_caption}"
# Alt-text scraped from the web can be kilobytes of keyword spam; only its start is useful
# as context, and the prompt's token count must stay bounded.
MAX_ORIG_CAPTION_CHARS = 500

# A plain-text prompt file has no limits of its own: permissive ones that still catch an
# empty answer and a runaway generation.
TXT_DEFAULTS = {"min_words": 1, "max_words": 400, "max_new_tokens": 512}

_SHIPPED = "curate/prompt_sets/default.json"
_FILE_KEYS = {"version", "variants", "orig_caption_context"}
_VARIANT_INT_KEYS = ("min_words", "max_words", "max_new_tokens")
_VARIANT_KEYS = {"prompt", *_VARIANT_INT_KEYS, "orig_caption_context"}
# Variant names become parquet column names and items of `--variants long,short`.
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class PromptSpec:
    """One caption variant: the user-message text (the image is attached by the backend), the
    accepted length of its captions in words, and the generation budget."""

    name: str
    prompt: str
    min_words: int
    max_words: int
    max_new_tokens: int
    orig_caption_context: str | None = None

    @property
    def hash(self) -> str:
        """First 16 hex chars of sha256 over the canonical JSON of every field: any change to
        the prompt, its limits or its context template gives a new hash."""
        canonical = json.dumps(asdict(self), sort_keys=True, ensure_ascii=False,
                               separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def load_prompts(extra_files: Iterable[str | Path] = (),
                 variants: Sequence[str] | str | None = None) -> dict[str, PromptSpec]:
    """The shipped prompt set, then each extra file in order (`.json` prompt set or `.txt`
    single prompt), selected and ordered by `variants` (default: long, short; a
    comma-separated string such as "long,short" is accepted too).

    Raises ValueError naming the file and the variant or field at fault.
    """
    shipped_text = resources.files("curate").joinpath("prompt_sets", "default.json").read_text(
        encoding="utf-8")
    specs, context = _parse_json_set(shipped_text, _SHIPPED, inherited_context=None)
    shipped = set(specs)
    for extra in extra_files:
        path = Path(extra)
        if path.suffix.lower() == ".json":
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as e:
                raise ValueError(f"{path}: cannot read prompt file: {e}") from e
            new, context = _parse_json_set(text, str(path), inherited_context=context)
        elif path.suffix.lower() == ".txt":
            new = _parse_txt(path, context)
        else:
            raise ValueError(f"{path}: a prompt file must be .json (a prompt set) or .txt "
                             "(one prompt)")
        specs.update(new)

    if isinstance(variants, str):
        # "long,short" as typed after --variants; a str is also a Sequence of characters,
        # which would otherwise select variants named "l", "o", ...
        variants = [v.strip() for v in variants.split(",") if v.strip()]
    selected = list(DEFAULT_VARIANTS if variants is None else variants)
    if variants is None and (added := [name for name in specs if name not in shipped]):
        # Said, since a run over millions of images without the variant asked for is dear to redo.
        log.warning("the prompt files add the variant(s) %s, which are not generated: only %s are, unless "
                    "--variants names them (--variants %s)", ", ".join(added), ", ".join(selected),
                    ",".join([*selected, *added]))
    if not selected:
        raise ValueError("no caption variant selected")
    seen: set[str] = set()
    for name in selected:
        if name not in specs:
            raise ValueError(f"unknown caption variant {name!r}; available: "
                             f"{', '.join(sorted(specs))}")
        if name in seen:
            raise ValueError(f"caption variant {name!r} selected twice")
        seen.add(name)
    return {name: specs[name] for name in selected}


def build_prompt(spec: PromptSpec, orig_caption: str | None = None,
                 use_orig_caption: bool = False) -> str:
    """The user-message text for one image: the variant's prompt, followed, when asked for and
    when the image has an original caption, by the context template filled with it."""
    if not use_orig_caption or not spec.orig_caption_context:
        return spec.prompt
    caption = " ".join((orig_caption or "").split())
    if not caption:
        return spec.prompt
    if len(caption) > MAX_ORIG_CAPTION_CHARS:
        cut = caption[:MAX_ORIG_CAPTION_CHARS]
        caption = (cut.rsplit(" ", 1)[0] if " " in cut else cut) + "..."
    # str.replace, not str.format: the template or the caption may hold other braces.
    return spec.prompt + "\n\n" + spec.orig_caption_context.replace(ORIG_CAPTION_FIELD, caption)


def _parse_json_set(text: str, where: str, inherited_context: str | None
                    ) -> tuple[dict[str, PromptSpec], str | None]:
    """Parse one JSON prompt set; returns its variants and the context template now in force."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{where}: a prompt set must be a JSON object with a 'variants' field")
    unknown = sorted(set(data) - _FILE_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; "
                         f"expected {', '.join(sorted(_FILE_KEYS))}")
    if "version" in data and (not isinstance(data["version"], int)
                              or isinstance(data["version"], bool)):
        raise ValueError(f"{where}: field 'version' must be an integer")
    # A file that does not mention the context template keeps the one already in force; an
    # explicit null turns it off for this file's variants.
    context = inherited_context
    if "orig_caption_context" in data:
        context = _check_context(data["orig_caption_context"], where, "orig_caption_context")
    variants = data.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise ValueError(f"{where}: field 'variants' must be a non-empty object of "
                         "name -> {prompt, min_words, max_words, max_new_tokens}")
    specs = {name: _parse_variant(name, body, where, context) for name, body in variants.items()}
    return specs, context


def _parse_variant(name: str, body: Any, where: str, context: str | None) -> PromptSpec:
    label = f"{where}: variant {name!r}"
    if not _NAME.match(name):
        raise ValueError(f"{label}: a variant name is a letter followed by letters, digits, "
                         "'_' or '-'")
    if not isinstance(body, dict):
        raise ValueError(f"{label}: must be an object with prompt, min_words, max_words, "
                         "max_new_tokens")
    unknown = sorted(set(body) - _VARIANT_KEYS)
    if unknown:
        raise ValueError(f"{label}: unknown field(s) {', '.join(map(repr, unknown))}")
    for key in ("prompt", *_VARIANT_INT_KEYS):
        if key not in body:
            raise ValueError(f"{label}: field {key!r} is missing")
    prompt = body["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{label}: field 'prompt' must be a non-empty string")
    ints = {}
    for key in _VARIANT_INT_KEYS:
        value = body[key]
        # bool is an int subclass; `true` for a word count is a mistake, not 1.
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{label}: field {key!r} must be a positive integer, got {value!r}")
        ints[key] = value
    if ints["min_words"] > ints["max_words"]:
        raise ValueError(f"{label}: field 'min_words' ({ints['min_words']}) is greater than "
                         f"'max_words' ({ints['max_words']})")
    if "orig_caption_context" in body:
        context = _check_context(body["orig_caption_context"], label, "orig_caption_context")
    return PromptSpec(name=name, prompt=prompt.strip(), orig_caption_context=context, **ints)


def _parse_txt(path: Path, context: str | None) -> dict[str, PromptSpec]:
    name = path.stem
    if not _NAME.match(name):
        raise ValueError(f"{path}: the file's stem {name!r} names the variant and must be a "
                         "letter followed by letters, digits, '_' or '-'")
    try:
        prompt = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ValueError(f"{path}: cannot read prompt file: {e}") from e
    if not prompt:
        raise ValueError(f"{path}: the prompt file is empty")
    return {name: PromptSpec(name=name, prompt=prompt, orig_caption_context=context,
                             **TXT_DEFAULTS)}


def _check_context(value: Any, where: str, key: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or ORIG_CAPTION_FIELD not in value:
        raise ValueError(f"{where}: field {key!r} must be a string containing "
                         f"{ORIG_CAPTION_FIELD} (or null)")
    return value
