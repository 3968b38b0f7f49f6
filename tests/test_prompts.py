"""Prompt sets: the shipped file, users' JSON and .txt additions, errors that name the
field, prompt building with the original caption, and hash stability."""

from __future__ import annotations

import dataclasses
import json
from importlib import resources

import pytest

from curate.prompts import (
    DEFAULT_VARIANTS,
    MAX_ORIG_CAPTION_CHARS,
    TXT_DEFAULTS,
    PromptSpec,
    build_prompt,
    load_prompts,
)


def write_json(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_shipped_prompt_set():
    raw = json.loads(resources.files("curate").joinpath("prompt_sets", "default.json")
                     .read_text(encoding="utf-8"))
    assert raw["version"] == 1 and set(raw["variants"]) == {"long", "short"}
    specs = load_prompts()
    assert list(specs) == list(DEFAULT_VARIANTS) == ["long", "short"]
    long, short = specs["long"], specs["short"]
    assert (long.min_words, long.max_words, long.max_new_tokens) == (60, 260, 400)
    assert (short.min_words, short.max_words, short.max_new_tokens) == (3, 15, 48)
    # what the prompts ask for, so a rewrite that drops a requirement is noticed
    for word in ("100 to 200 words", "composition", "lighting", "colour", "materials",
                 "text", "double quotes", "style and medium", "no lists"):
        assert word in long.prompt, word
    assert "15 words" in short.prompt and "main subject" in short.prompt
    for spec in specs.values():
        assert spec.name in ("long", "short")
        assert "{orig_caption}" in spec.orig_caption_context
        assert "wrong" in spec.orig_caption_context
        # the token budget fits the longest accepted caption (about 1.3 tokens a word)
        assert spec.max_new_tokens >= 1.3 * spec.max_words


def test_variants_select_and_order():
    assert list(load_prompts(variants=["short"])) == ["short"]
    assert list(load_prompts(variants=["short", "long"])) == ["short", "long"]
    assert list(load_prompts(variants="short, long")) == ["short", "long"]
    with pytest.raises(ValueError, match="unknown caption variant 'tags'.*long, short"):
        load_prompts(variants=["long", "tags"])
    with pytest.raises(ValueError, match="selected twice"):
        load_prompts(variants=["long", "long"])
    with pytest.raises(ValueError, match="no caption variant"):
        load_prompts(variants=[])


def test_user_json_adds_and_replaces_variants(tmp_path, caplog):
    user = write_json(tmp_path / "mine.json", {"variants": {
        "tags": {"prompt": "List 10 to 20 comma-separated tags.", "min_words": 5,
                 "max_words": 40, "max_new_tokens": 80},
        "short": {"prompt": "Name the subject in under ten words.", "min_words": 2,
                  "max_words": 10, "max_new_tokens": 32},
    }})
    shipped = load_prompts()
    specs = load_prompts([user], variants=["long", "short", "tags"])
    assert list(specs) == ["long", "short", "tags"]
    assert specs["long"] == shipped["long"]  # untouched
    assert specs["short"].prompt == "Name the subject in under ten words."
    assert specs["short"].max_words == 10
    assert specs["tags"].max_new_tokens == 80
    # a file without orig_caption_context keeps the shipped template
    assert specs["tags"].orig_caption_context == shipped["long"].orig_caption_context
    # added variants are only used when selected, and the log says so when --variants was not given
    with caplog.at_level("WARNING", logger="curate"):
        assert "tags" not in load_prompts([str(user)])
    assert "add the variant(s) tags, which are not generated" in caplog.text
    assert "--variants long,short,tags" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="curate"):
        load_prompts([str(user)], variants=["long", "short"])  # chosen: nothing to say
    assert caplog.text == ""


def test_later_files_win_and_context_can_be_replaced_or_turned_off(tmp_path):
    first = write_json(tmp_path / "a.json", {
        "version": 3, "orig_caption_context": "Alt-text (unreliable): {orig_caption}",
        "variants": {"style": {"prompt": "Describe the style.", "min_words": 5,
                               "max_words": 80, "max_new_tokens": 120}}})
    second = write_json(tmp_path / "b.json", {"variants": {
        "style": {"prompt": "Describe the art style only.", "min_words": 5, "max_words": 60,
                  "max_new_tokens": 100},
        "plain": {"prompt": "Describe it.", "min_words": 5, "max_words": 60,
                  "max_new_tokens": 100, "orig_caption_context": None}}})
    specs = load_prompts([first, second], variants=["style", "plain"])
    assert specs["style"].prompt == "Describe the art style only."
    # the second file names no template: the one in force (from the first file) carries on
    assert specs["style"].orig_caption_context == "Alt-text (unreliable): {orig_caption}"
    assert specs["plain"].orig_caption_context is None
    assert build_prompt(specs["plain"], "a cat", use_orig_caption=True) == "Describe it."


def test_txt_prompt_file_is_one_variant(tmp_path):
    (tmp_path / "tags.txt").write_text("  List tags for this image, comma separated.\n",
                                       encoding="utf-8")
    (tmp_path / "long.txt").write_text("Describe everything.\nBe thorough.", encoding="utf-8")
    specs = load_prompts([tmp_path / "tags.txt", str(tmp_path / "long.txt")],
                         variants=["long", "tags"])
    tags = specs["tags"]
    assert tags == PromptSpec(name="tags", prompt="List tags for this image, comma separated.",
                              orig_caption_context=load_prompts()["long"].orig_caption_context,
                              **TXT_DEFAULTS)
    assert (tags.min_words, tags.max_words, tags.max_new_tokens) == (1, 400, 512)
    assert specs["long"].prompt == "Describe everything.\nBe thorough."
    assert specs["long"].max_words == 400


@pytest.mark.parametrize(("data", "message"), [
    ({"variants": {"tags": {"prompt": "p", "min_words": 1, "max_new_tokens": 9}}},
     r"variant 'tags': field 'max_words' is missing"),
    ({"variants": {"tags": {"min_words": 1, "max_words": 2, "max_new_tokens": 9}}},
     r"variant 'tags': field 'prompt' is missing"),
    ({"variants": {"tags": {"prompt": " ", "min_words": 1, "max_words": 2,
                            "max_new_tokens": 9}}},
     r"variant 'tags': field 'prompt' must be a non-empty string"),
    ({"variants": {"tags": {"prompt": "p", "min_words": 30, "max_words": 20,
                            "max_new_tokens": 9}}},
     r"variant 'tags': field 'min_words' \(30\) is greater than 'max_words' \(20\)"),
    ({"variants": {"tags": {"prompt": "p", "min_words": "3", "max_words": 20,
                            "max_new_tokens": 9}}},
     r"variant 'tags': field 'min_words' must be a positive integer"),
    ({"variants": {"tags": {"prompt": "p", "min_words": 1, "max_words": 20,
                            "max_new_tokens": True}}},
     r"variant 'tags': field 'max_new_tokens' must be a positive integer"),
    ({"variants": {"tags": {"prompt": "p", "min_words": 0, "max_words": 20,
                            "max_new_tokens": 9}}},
     r"variant 'tags': field 'min_words' must be a positive integer"),
    ({"variants": {"tags": {"prompt": "p", "min_words": 1, "max_word": 20,
                            "max_new_tokens": 9}}},
     r"variant 'tags': unknown field\(s\) 'max_word'"),
    ({"variants": {"tags": "Describe it."}}, r"variant 'tags': must be an object"),
    ({"variants": {"my tags": {"prompt": "p", "min_words": 1, "max_words": 2,
                               "max_new_tokens": 9}}},
     r"variant 'my tags': a variant name"),
    ({"variants": {}}, r"field 'variants' must be a non-empty object"),
    ({"prompts": {}}, r"unknown field\(s\) 'prompts'"),
    ({"version": "1", "variants": {}}, r"field 'version' must be an integer"),
    ({"orig_caption_context": "Alt-text: {caption}", "variants": {}},
     r"field 'orig_caption_context' must be a string containing \{orig_caption\}"),
    (["long"], r"must be a JSON object"),
])
def test_bad_json_names_the_file_and_field(tmp_path, data, message):
    path = write_json(tmp_path / "bad.json", data)
    with pytest.raises(ValueError, match=message) as err:
        load_prompts([path])
    assert str(path) in str(err.value)


def test_unreadable_and_unsupported_files(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"variants": {', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.json: not valid JSON"):
        load_prompts([broken])
    with pytest.raises(ValueError, match=r"missing\.json: cannot read"):
        load_prompts([tmp_path / "missing.json"])
    with pytest.raises(ValueError, match=r"missing\.txt: cannot read"):
        load_prompts([tmp_path / "missing.txt"])
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty\.txt: the prompt file is empty"):
        load_prompts([tmp_path / "empty.txt"])
    (tmp_path / "my style.txt").write_text("Describe the style.", encoding="utf-8")
    with pytest.raises(ValueError, match=r"my style\.txt: the file's stem 'my style'"):
        load_prompts([tmp_path / "my style.txt"])
    (tmp_path / "p.yaml").write_text("variants: {}", encoding="utf-8")
    with pytest.raises(ValueError, match=r"p\.yaml: a prompt file must be \.json"):
        load_prompts([tmp_path / "p.yaml"])


def test_build_prompt():
    spec = load_prompts()["long"]
    assert build_prompt(spec) == spec.prompt
    # the original caption is used only when asked for, and only when there is one
    assert build_prompt(spec, "Eiffel Tower at night") == spec.prompt
    assert build_prompt(spec, None, use_orig_caption=True) == spec.prompt
    assert build_prompt(spec, "  \n ", use_orig_caption=True) == spec.prompt
    text = build_prompt(spec, "  Eiffel Tower\n at   night ", use_orig_caption=True)
    assert text.startswith(spec.prompt + "\n\n")
    assert '"Eiffel Tower at night"' in text and "{orig_caption}" not in text
    # braces in the caption or the template are text, not format fields
    braces = dataclasses.replace(spec, orig_caption_context="{x} Alt: {orig_caption} {0}")
    assert build_prompt(braces, "a {weird} caption", True).endswith(
        "{x} Alt: a {weird} caption {0}")
    # keyword-spam alt-text is cut at a word boundary
    spam = " ".join(["cheap", "shoes", "sale"] * 200)
    context = build_prompt(spec, spam, use_orig_caption=True)[len(spec.prompt) + 2:]
    kept = context.split('"')[1]
    assert kept.endswith("...") and spam.startswith(kept[:-3])
    assert MAX_ORIG_CAPTION_CHARS - 10 < len(kept) <= MAX_ORIG_CAPTION_CHARS + 3
    assert kept[:-3].split()[-1] in ("cheap", "shoes", "sale")  # no word cut in half


def test_hash_is_stable_and_covers_every_field():
    spec = PromptSpec("long", "Describe this image.", 60, 260, 400, "Alt: {orig_caption}")
    same = PromptSpec("long", "Describe this image.", 60, 260, 400, "Alt: {orig_caption}")
    assert spec.hash == same.hash and len(spec.hash) == 16
    int(spec.hash, 16)
    # pinned: captions written today must match the hash a rerun computes on another
    # machine next year (sha256 of the sorted, compact JSON of the fields)
    assert spec.hash == "3b35c172f76a1b2c"
    changes = [
        {"name": "long2"}, {"prompt": "Describe this image!"}, {"min_words": 61},
        {"max_words": 259}, {"max_new_tokens": 401}, {"orig_caption_context": None},
        {"orig_caption_context": "Alt-text: {orig_caption}"},
    ]
    hashes = {spec.hash} | {dataclasses.replace(spec, **c).hash for c in changes}
    assert len(hashes) == len(changes) + 1
    # the shipped prompts hash the same on every load
    assert load_prompts()["long"].hash == load_prompts()["long"].hash
    assert load_prompts()["long"].hash != load_prompts()["short"].hash


def test_specs_are_frozen():
    spec = load_prompts()["short"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.prompt = "changed"  # type: ignore[misc]
