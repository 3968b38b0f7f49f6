"""VQAScore (Lin et al. 2024, "Evaluating Text-to-Visual Generation with Image-to-Text
Generation"): the probability a vision-language model gives the answer "Yes" to ``QUESTION``
about an image and a text. It reads the whole text, where CLIP reads 77 tokens, and its paper
found it closer to human judgements of image-text alignment than the CLIP score.

Two uses: ``curate score --vqa`` asks it of every training image and each of its captions (does
the recaption describe the image, or did the captioner make things up?), and ``evaluate
--metrics vqa-score`` of every generated image and its prompt. Better a judge other than the model
that wrote the captions, whose own phrasing it would favour.

The model loads through the captioner's path (``AutoModelForImageTextToText``, its chat template,
left padding; bf16 on a GPU, float32 on the CPU) at ``load()`` or the first call, so that decoding
workers fork before it and a stored evaluation needs no weights. Images larger than
``MAX_PIXELS`` are scaled down to it first (keeping their aspect ratio): the processors of
Qwen2-VL and its successors would otherwise turn a 2048 px photograph into thousands of tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from curate.models import local_fingerprint, resolve_model, resolved_commit
from curate.runner import CurateError
from curate.shards import stable_hash

QUESTION = 'Does this figure show "{}"? Please answer yes or no.'  # the paper's template
ANSWER = "Yes"
MAX_PIXELS = 448 * 448  # 256 visual tokens for Qwen2-VL (28 px a token after its 2x2 merge)
MAX_ASPECT = 200  # Qwen2-VL's image processors refuse an image longer than 200 times its short side


class VqaScorer:
    """Images and their texts -> VQAScore, float64 [B, 1] on the CPU."""

    needs_captions = True  # evaluate: the network reads each image's prompt

    def __init__(self, name: str = "qwen2.5-vl", *, revision: str | None = None, device: str | None = None,
                 batch_size: int = 8):
        self.ref = resolve_model(name, "vlm", revision)
        self.name, self.revision, self.device, self.batch_size = name, revision, device, batch_size
        self._vlm: Any = None
        # What decides the scores (evaluate's network identity; curate score's config).
        self.identity: dict[str, Any] = {"id": self.ref.id, "revision": revision, "class": "AutoModelForImageTextToText",
                                         "question": QUESTION, "answer": ANSWER, "max_pixels": MAX_PIXELS}
        if self.ref.local:
            self.identity["fingerprint"] = local_fingerprint(self.ref.id)
        self.key = f"vqascore-{stable_hash(self.identity)[:8]}"

    def load(self) -> Any:
        """The captioner holding processor and model (loaded once)."""
        if self._vlm is None:
            from curate.captioners.base import CaptionerError
            from curate.captioners.transformers_backend import TransformersCaptioner

            try:
                vlm = TransformersCaptioner(self.ref.id, revision=self.revision, device=self.device,
                                            batch_size=self.batch_size)
            except CaptionerError as e:
                raise CurateError(f"VQAScore's model: {e}") from e
            answer = vlm.tokenizer.encode(ANSWER, add_special_tokens=False)
            if len(answer) != 1:
                raise CurateError(f"VQAScore's model {self.name!r}: its tokenizer splits {ANSWER!r} into "
                                  f"{len(answer)} tokens; VQAScore reads the probability of one")
            self._vlm, self.answer_id = vlm, answer[0]
        return self._vlm

    @property
    def commit(self) -> str | None:
        """The Hub commit of the model's snapshot in the cache (None for a folder)."""
        return None if self.ref.local else resolved_commit(self.ref.id, self.revision)

    @staticmethod
    def prepare(image: Image.Image) -> torch.Tensor:
        """One image as uint8 [3, H, W], RGB, at most ``MAX_PIXELS`` (what decoding workers run)."""
        return torch.from_numpy(np.asarray(_fit(image)).copy()).permute(2, 0, 1)

    def __call__(self, images: torch.Tensor | Sequence[torch.Tensor], texts: Sequence[str]) -> torch.Tensor:
        """``images``: uint8 [B, 3, H, W], or B uint8 [3, H, W] of any sizes; one text per image."""
        if len(texts) != len(images):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        vlm = self.load()
        pictures = [_fit(Image.fromarray(image.permute(1, 2, 0).cpu().numpy())) for image in images]
        scores = []
        for start in range(0, len(pictures), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            prompts = [vlm.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION.format(text)}]}],
                tokenize=False, add_generation_prompt=True) for text in texts[chunk]]
            inputs = vlm.processor(text=prompts, images=pictures[chunk], padding=True,
                                   return_tensors="pt").to(vlm.device, dtype=vlm.dtype)
            with torch.inference_mode():
                # Left padding: every row's last position predicts its answer, the only logits kept
                # (all of them would be batch x tokens x 152k). No cache: one forward.
                logits = vlm.model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1].float()
            scores.append(logits.log_softmax(-1)[:, self.answer_id].exp().double().cpu())
        return torch.cat(scores)[:, None]


def _fit(image: Image.Image) -> Image.Image:
    """RGB, scaled down (bicubic, aspect kept) to at most ``MAX_PIXELS``; one that would then be
    longer than ``MAX_ASPECT`` times its short side padded to ``MAX_ASPECT``:1 (:func:`_letterbox`)."""
    image = image.convert("RGB")
    fitted = image
    if image.width * image.height > MAX_PIXELS:
        scale = math.sqrt(MAX_PIXELS / (image.width * image.height))
        fitted = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))),
                              Image.Resampling.BICUBIC)
    if max(fitted.size) > MAX_ASPECT * min(fitted.size):
        return _letterbox(image)
    return fitted


def _letterbox(image: Image.Image) -> Image.Image:
    """An image longer than ``MAX_ASPECT`` times its short side (a banner, a whole page's
    screenshot: ingest accepts them), which Qwen2-VL's processors refuse (a ValueError, which would
    stop the stage): scaled down as needed (bicubic, aspect kept) and padded with black on both sides
    of its short side to ``MAX_ASPECT``:1, within ``MAX_PIXELS`` (so that fitting it again keeps it)."""
    wide = image.width >= image.height
    long, short = (image.width, image.height) if wide else (image.height, image.width)
    target = min(long, math.isqrt(MAX_PIXELS * MAX_ASPECT))
    while target * math.ceil(target / MAX_ASPECT) > MAX_PIXELS:
        target -= 1
    content = max(1, round(short * target / long))
    side = max(content, math.ceil(target / MAX_ASPECT))
    if target != long:
        image = image.resize((target, content) if wide else (content, target), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (target, side) if wide else (side, target))
    canvas.paste(image, (0, (side - content) // 2) if wide else ((side - content) // 2, 0))
    return canvas
