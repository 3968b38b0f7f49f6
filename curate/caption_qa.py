"""Caption quality control shared by every recaption backend.

`clean_caption` removes what a VLM adds around a caption (quotes, markdown, "The image
shows"); `check_caption` then decides whether the cleaned caption is usable for its variant.
Every decision is a named flag recorded with the caption, so a dataset can be audited and the
thresholds revisited. Failures come in a fixed priority order, and the first is the reason a
caption that fails all its retries is rejected with: the most causal problem first (a
repetition loop usually also runs into the token limit and past max_words).

Pure Python and precompiled regexes: about 5,000 long (150-word) or 40,000 short captions
per second on one core, so it never matters next to generation.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field

from curate.prompts import PromptSpec

# Failures, in priority order; the first present is a rejected caption's reason.
FAILURE_FLAGS: tuple[str, ...] = (
    "backend_error",  # the backend gave up on this request (finish_reason "error")
    "empty",  # nothing left after cleaning
    "refusal",  # "I'm sorry, I cannot..." in the first words
    "repetition",  # a generation loop
    "truncated",  # cut by the token limit, or a long caption ending mid-sentence
    "too_short",  # fewer words than the variant's min_words
    "too_long",  # more words than the variant's max_words
)
# Recorded but not a reason to reject: they measure how often the prompt is disobeyed.
INFO_FLAGS: tuple[str, ...] = ("boilerplate_stripped", "markdown_stripped")

# Refusals are looked for in the first words only: a refusal opens the answer, while a
# description can legitimately contain "cannot" or "sorry" (on a sign, say) further on.
REFUSAL_WINDOW_WORDS = 20
# Variants whose captions must end as a sentence: a long paragraph that stops without
# terminal punctuation was cut off; a short caption often has no final period at all.
SENTENCE_MIN_WORDS = 20

# Repetition loops. A period-n word n-gram repeated back to back at least this many times:
# natural prose repeats single words ("the", "very") and short phrases ("on the left.
# On the left") at most twice in a row, loops repeat until the token limit.
MAX_LOOP_PERIOD = 8
LOOP_COPIES = {1: 4}  # a single word four times in a row ("very very very very")
LOOP_COPIES_DEFAULT = 3  # any 2..8-word phrase three times in a row
# Or, over the whole caption, the share of word 4-grams that repeat an earlier one. Good
# 100-200 word descriptions stay under ~0.1 ("on the left side", "in the background of");
# loops of a sentence or a list longer than 8 words push it past 0.5.
REPEATED_4GRAM_FRACTION = 0.3
MIN_4GRAMS = 20  # too few 4-grams to judge a fraction on
# Loops without spaces ("hahahaha...", CJK characters): a 1-6 character unit, holding at
# least one letter or digit, ten times in a row. Dot leaders in a menu are punctuation only.
_CHAR_LOOP = re.compile(r"(\S{1,6}?)\1{9,}")

_WORD = re.compile(r"[\w'’-]+")
_QUOTED = re.compile(r"\"[^\"]*\"|“[^”]*”|„[^“”]*[“”]|«[^»]*»")

_REFUSAL = re.compile(
    r"\b(?:"
    r"i'?m sorry|i am sorry|sorry,? (?:but )?i\b|i apologi[sz]e"
    r"|i can ?not\b|i can'?t\b|i could(?:n'?t| not)\b|i won'?t be able"
    r"|i'?m unable|i am unable|i'?m not able to|i am not able to"
    r"|unable to (?:provide|assist|help with|describe|identify|process|comply)"
    r"|as an ai\b(?!-)|as a language model|i'?m an ai\b(?!-)|i am an ai\b(?!-)"
    r"|i (?:do not|don'?t) (?:see|have) (?:an?|the|any) (?:image|picture|photo)"
    r"|no image (?:was |is |has been )?(?:provided|attached|uploaded|included)"
    r")",
    re.IGNORECASE,
)

# Boilerplate openings. Only generic nouns for the image are stripped: "The photo shows a
# dog" says nothing "A dog" does not, while "The painting depicts..." or "A screenshot
# of..." name the medium, which a text-to-image model should learn.
# ("frame" is not one: "The frame features a gilded border" is about a picture frame.)
_NOUN = r"(?:image|picture|photo|photograph|pic|snapshot|shot|scene)"
_VERB = (r"(?:shows|depicts|features|captures|presents|displays|showcases|portrays|"
         r"illustrates|contains|highlights|reveals|is of|consists of|is showing|is depicting)")
_SEE = r"(?:there (?:is|are)|(?:we|you|one|i) (?:can )?see|we are looking at|is shown|are shown)"
_BOILERPLATE = [re.compile(p, re.IGNORECASE) for p in (
    # Chat preambles: "Sure! Here is a detailed description of the image:"
    r"^(?:sure|certainly|of course|okay|ok|absolutely)\b[!,.:]\s*",
    r"^here(?: is|'s|’s) (?:a |an |the |my )?(?:\w+ ){0,3}?(?:description|caption|summary)"
    r"(?: of (?:the|this) " + _NOUN + r")?\s*[:.\-–—]\s*",
    # Label prefixes: "Caption: ...", "Detailed description: ..."
    r"^(?:(?:detailed|long|short|image|final) )*(?:caption|description)(?:\s*:|\s+[-–—])\s*",
    # "The image shows", "This photo depicts", "The picture features", "The scene captures"
    r"^(?:the|this) " + _NOUN + r" (?:\w+ly )?" + _VERB + r"\b[:,]?\s*",
    # "In this image, there is", "In the picture we can see", "In this image,"; the comma or
    # the verb must follow, or "In the shot glass on the left..." would lose its subject.
    r"^in (?:the|this) " + _NOUN + r"(?:\s*,\s*(?:" + _SEE + r"\b\s*:?\s*)?|\s+" + _SEE
    + r"\b\s*:?\s*)",
    # "This is an image of", "An image of", "A picture of" (not "The picture of a saint
    # hangs...": there the picture is a thing in the scene)
    r"^(?:this is )?an? (?:image|picture|pic) of\s+",
    # "The image is a close-up photograph of" -> "A close-up photograph of"
    r"^(?:the|this) (?:image|picture) is (?=(?:an?|the) )",
    # "This is a cozy living room" -> "A cozy living room"
    r"^this is (?=(?:an?|the|two|three|four|several|many) )",
    r"^(?:we|you) (?:can )?see\s+",
)]

_MD_HEADER = re.compile(r"^#{1,6}\s+")
_MD_BULLET = re.compile(r"^(?:[-*+•]|\d{1,2}[.)])\s+")
_MD_BOLD = re.compile(r"\*\*(.+?)\*\*|__(.+?)__")
_MD_ITALIC = re.compile(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])")
_MD_FENCE = re.compile(r"^```\w*\s*|\s*```$")
# A line that is only a label for what follows: "Image Description:", "## Caption".
_LABEL_LINE = re.compile(r"^(?:(?:detailed|long|short|image|final) )*(?:caption|description)"
                         r"\s*:?$", re.IGNORECASE)
_QUOTE_PAIRS = {'"': '"', "“": "”", "'": "'", "‘": "’", "«": "»", "`": "`"}
_TERMINAL = re.compile(r"[.!?…。！？][\"'”’»)\]]*$")


@dataclass
class CaptionQA:
    """The verdict on one generation: the cleaned caption and every flag raised."""

    text: str  # the cleaned caption
    words: int  # words in the cleaned caption (whitespace-separated)
    flags: list[str] = field(default_factory=list)  # failures first, then informational flags
    failures: list[str] = field(default_factory=list)  # the rejecting flags, in FAILURE_FLAGS order

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def reason(self) -> str | None:
        """The reason a caption is rejected with: its highest-priority failure."""
        return self.failures[0] if self.failures else None


def clean_caption(text: str) -> tuple[str, list[str]]:
    """Strip what is not caption: surrounding whitespace and quotes, markdown (headers,
    bullets, bold, italics, code fences) and boilerplate openings ("The image shows", "In
    this image, there is", "Sure! Here is a description:"), re-capitalising what remains.
    The caption is otherwise untouched: an incomplete final sentence is left for
    check_caption to flag. Returns (cleaned, info_flags)."""
    flags: list[str] = []
    text = text.strip()
    cleaned = _strip_markdown(text)
    if cleaned != " ".join(text.split()):
        flags.append("markdown_stripped")
    text = cleaned

    stripped = False
    # Openings nest ("Sure! Here is the caption: "The image shows..."), so repeat until
    # nothing changes; each pass removes at least one character, so this ends.
    while True:
        before = text
        text = _strip_quotes(text)
        for pattern in _BOILERPLATE:
            new = pattern.sub("", text, count=1)
            # Never strip a caption down to nothing: "The image shows" alone is left whole
            # (and fails as too short) rather than turned into an empty caption.
            if new != text and new.strip():
                text = new.lstrip()
                stripped = True
        if text == before:
            break
    if stripped:
        flags.append("boilerplate_stripped")
        if text[:1].islower():
            text = text[0].upper() + text[1:]
    return text, flags


def check_caption(text: str, finish_reason: str, spec: PromptSpec) -> CaptionQA:
    """Clean one generation and judge it against its variant. `finish_reason` is the
    backend's: "stop", "length" (the token limit cut it), "error" (the backend gave up) or
    "refused" (the server marked the answer a refusal)."""
    if finish_reason == "error":
        # An error's text is a message or nothing; judging it as a caption means nothing.
        return CaptionQA(text="", words=0, flags=["backend_error"], failures=["backend_error"])
    if finish_reason == "refused":  # said by the server, in words the patterns below may not know
        return CaptionQA(text="", words=0, flags=["refusal"], failures=["refusal"])
    cleaned, info = clean_caption(text)
    words = len(cleaned.split())
    found: set[str] = set()
    if not cleaned:
        found.add("empty")
    else:
        if _is_refusal(cleaned):
            found.add("refusal")
        if _has_repetition(cleaned):
            found.add("repetition")
        if finish_reason == "length" or (spec.min_words >= SENTENCE_MIN_WORDS
                                         and not _ends_sentence(cleaned)):
            found.add("truncated")
        if words < spec.min_words:
            found.add("too_short")
        if words > spec.max_words:
            found.add("too_long")
    failures = [f for f in FAILURE_FLAGS if f in found]
    return CaptionQA(text=cleaned, words=words, flags=failures + info, failures=failures)


def _strip_markdown(text: str) -> str:
    """Markdown and line structure out, one line of prose back."""
    text = _MD_FENCE.sub("", text)
    lines = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        header = _MD_HEADER.match(line)
        line = _MD_HEADER.sub("", line)
        line = _MD_BULLET.sub("", line)
        line = _MD_BOLD.sub(lambda m: m.group(1) or m.group(2), line)
        line = _MD_ITALIC.sub(r"\1", line).strip()
        # Section titles ("## Lighting", "Image Description:") label the prose that follows
        # and describe nothing themselves.
        if _LABEL_LINE.match(line) or (header and len(line.split()) <= 6
                                       and not _TERMINAL.search(line)):
            continue
        if line:
            lines.append(line)
    return " ".join(" ".join(lines).split())


def _ends_sentence(text: str) -> bool:
    """Terminal punctuation, possibly inside closing quotes or brackets; or a closed quotation
    ('... above the door, a sign reads "OPEN"'): a cut-off quotation is left open."""
    if _TERMINAL.search(text):
        return True
    if text.endswith("”"):
        return text.count("“") == text.count("”")
    if text.endswith('"'):
        return text.count('"') % 2 == 0
    return False


def _strip_quotes(text: str) -> str:
    """Remove one pair of quotes around the whole caption, but not quotes that merely open and
    close it ('"OPEN" reads the sign above the "BAKERY"' keeps both)."""
    if len(text) < 2 or text[0] not in _QUOTE_PAIRS or text[-1] != _QUOTE_PAIRS[text[0]]:
        return text
    opening, closing = text[0], text[-1]
    inner = text[1:-1]
    if opening in ("'", "‘"):
        # Apostrophes inside words ("cat's") are not quotes.
        quotes = [i for i, c in enumerate(inner) if c in "'’"
                  and not (0 < i < len(inner) - 1 and inner[i - 1].isalnum()
                           and inner[i + 1].isalnum())]
        if quotes:
            return text
    elif opening in inner or closing in inner:
        return text
    return inner.strip()


def _is_refusal(text: str) -> bool:
    # Quoted text is what the image says ('a mug reading "I can't even"'), not the model.
    head = " ".join(_QUOTED.sub(" ", text).split()[:REFUSAL_WINDOW_WORDS])
    return _REFUSAL.search(head.replace("’", "'")) is not None


def _has_repetition(text: str) -> bool:
    # A character loop of ten copies lies inside one whitespace-free run of 10+ characters;
    # running the regex on those runs only keeps it off ordinary words.
    for run in text.split():
        if len(run) >= 10:
            for m in _CHAR_LOOP.finditer(run):
                if any(c.isalnum() for c in m.group(1)):
                    return True
    tokens = _WORD.findall(text.lower())
    # Back-to-back copies of a period-n n-gram: a run of r positions where token i equals
    # token i+n means the n-gram there occurs 1 + r // n times in a row. The comparisons
    # run in C (map over operator.eq into bytes) and the run is a substring search.
    for n in range(1, MAX_LOOP_PERIOD + 1):
        needed = (LOOP_COPIES.get(n, LOOP_COPIES_DEFAULT) - 1) * n
        if b"\x01" * needed in bytes(map(operator.eq, tokens, tokens[n:])):
            return True
    total = len(tokens) - 3
    if total >= MIN_4GRAMS:
        distinct = len(set(zip(tokens, tokens[1:], tokens[2:], tokens[3:], strict=False)))
        if (total - distinct) / total >= REPEATED_4GRAM_FRACTION:
            return True
    return False
