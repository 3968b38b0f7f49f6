"""`curate score DATA/images --out DATA/scores/clip [--captions ...] [--aesthetic FILE] [--classifier nsfw]`.

Per-sample scores to filter a dataset on (``curate manifest --scores DATA/scores/clip --where ...``):

- ``clip_<variant>``: the cosine similarity of CLIP's image embedding and the embedding of the
  sample's caption of that variant: ``orig`` (the image stage's original caption) and every
  variant of ``--captions`` (``long``, ``short``...). DataComp's CLIP-score filter keeps the web
  pairs whose original caption matches their image; on recaptions it finds the captions that
  describe something else. Null when the sample has no such caption. The text tower reads 77
  tokens: a longer caption is scored on its start and flagged ``<variant>_truncated``.
- ``aesthetic`` (``--aesthetic FILE``): a LAION-style aesthetic predictor, the linear head of
  christophschuhmann/improved-aesthetic-predictor (``sac+logos+ava1-l14-linearMSE.pth``: linear
  layers applied in order to the L2-normalised image embedding of CLIP ViT-L/14), loaded from
  its state dict (``.pth`` with ``weights_only``, or ``.safetensors``).
- ``nsfw``, ``watermark``, ``LABEL`` (``--classifier``): the probability an image classifier
  (``AutoModelForImageClassification``) gives one of its labels: NSFW and watermark detectors.
  With ``--model none`` they run without CLIP.

Output per image shard: ``DATA/scores/NAME/000123.parquet`` (a table, no tar), one row per
accepted image, in the image stage's order. Images are decoded and prepared by the model's image
processor in DataLoader workers, ahead of the model.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import torch

from curate import storage
from curate.images import ImageStream
from curate.manifest import file_sha256
from curate.runner import (
    CurateError,
    ShardTask,
    Stage,
    image_stage_tasks,
    read_image_captions,
    stage_of_kind,
)
from curate.shards import ShardWriter, committed_shards, index_columns, read_index
from curate.stats import rounded
from curate.subset import EMBEDDING_COLUMN
from curate.vqa import VqaScorer

log = logging.getLogger("curate")


class AestheticHead(torch.nn.Module):
    """The improved aesthetic predictor's head: its linear layers, in the order of their index in
    the state dict (``layers.0``, ``layers.2``... : the dropouts between them hold no weights),
    with no activation between them, as it was trained."""

    def __init__(self, state: dict[str, torch.Tensor], source: str):
        super().__init__()
        indices = sorted({int(k.split(".")[1]) for k in state if k.startswith("layers.") and k.endswith(".weight")})
        if not indices or any(f"layers.{i}.bias" not in state for i in indices):
            raise CurateError(f"{source}: not an aesthetic predictor's state dict (layers.N.weight and "
                              f"layers.N.bias; it holds {', '.join(sorted(state)[:6])}...)")
        self.layers = torch.nn.ModuleList()
        width = None
        for i in indices:
            weight, bias = state[f"layers.{i}.weight"], state[f"layers.{i}.bias"]
            if weight.ndim != 2 or (width is not None and weight.shape[1] != width):
                raise CurateError(f"{source}: layer {i} takes {list(weight.shape)[1:]} inputs after a layer of "
                                  f"{width} outputs")
            layer = torch.nn.Linear(weight.shape[1], weight.shape[0])
            layer.load_state_dict({"weight": weight, "bias": bias})
            self.layers.append(layer)
            width = weight.shape[0]
        if width != 1:
            raise CurateError(f"{source}: its last layer has {width} outputs, not one score")
        self.input_dim = self.layers[0].in_features

    @classmethod
    def load(cls, path: str | Path) -> AestheticHead:
        path = Path(path)
        if not path.is_file():
            raise CurateError(f"--aesthetic {path}: no such file")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(path)
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a corrupt or foreign file: say which
            raise CurateError(f"--aesthetic {path}: cannot read a state dict from it: {e}") from e
        if not isinstance(state, dict):
            raise CurateError(f"--aesthetic {path}: holds a {type(state).__name__}, not a state dict")
        other = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
        if other:  # a training checkpoint (a state dict under "state_dict", an epoch...)
            raise CurateError(f"--aesthetic {path}: not a state dict: {', '.join(map(str, other[:4]))} hold no tensor "
                              "(a training checkpoint? save its model's state_dict)")
        return cls({k.removeprefix("module."): v.float() for k, v in state.items()}, str(path))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        x = embeddings
        for layer in self.layers:
            x = layer(x)
        return x[:, 0]


class ClipScorer:
    """A CLIP model (both towers) that embeds images and captions, normalised. The image processor
    and tokenizer load at once; the weights at ``load()`` (or the first use), so that decoding
    workers can start, and fork, before them. On a GPU the towers run in bf16 autocast."""

    def __init__(self, name: str, *, revision: str | None = None, device: str | None = None, bf16: bool = True):
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        from curate.models import resolve_model, resolved_commit
        from curate.runner import resolve_device

        ref = resolve_model(name, "image", revision)
        self.id, self.revision, self.local = ref.id, revision, ref.local
        self.device = resolve_device(device)
        self.bf16 = bf16  # bf16 autocast on a GPU; evaluate's CLIP score keeps float32 (GPU-independent numbers)
        problem = f"cannot load the CLIP model {name!r} ({ref.id}) with both towers and its tokenizer"
        try:
            self.config = AutoConfig.from_pretrained(ref.id, revision=revision)
            if self.config.model_type != "clip":  # an image tower alone (CMMD's) would load a random text tower
                raise CurateError(f"{problem}: it is a {self.config.model_type} model")
            self.processor = AutoImageProcessor.from_pretrained(ref.id, revision=revision)
            self.tokenizer = AutoTokenizer.from_pretrained(ref.id, revision=revision)
        except (OSError, ValueError) as e:
            raise CurateError(f"{problem}: {e}") from None
        self.max_tokens = int(self.config.text_config.max_position_embeddings)
        self.dim = int(self.config.projection_dim)
        self.commit = None if ref.local else resolved_commit(ref.id, revision, self.config)  # the Hub snapshot read
        self._problem, self._model = problem, None

    def load(self) -> torch.nn.Module:
        if self._model is None:
            from transformers import CLIPModel

            self._model = _load_frozen(CLIPModel, self.id, self.revision, self.device, self._problem)
        return self._model

    @property
    def model(self) -> torch.nn.Module:
        return self.load()

    def _autocast(self) -> Any:
        return _gpu_bf16(self.device, self.bf16)

    def prepare(self, image: Any) -> torch.Tensor:
        """One PIL image as the model's input (what the decoding workers run)."""
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    @torch.no_grad()
    def images(self, pixels: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            out = self.model.get_image_features(pixel_values=pixels.to(self.device))
        out = getattr(out, "pooler_output", out)  # a tensor, or (transformers >= 5.x) an output object
        return torch.nn.functional.normalize(out.float(), dim=-1)

    @torch.no_grad()
    def texts(self, captions: list[str]) -> tuple[torch.Tensor, list[bool]]:
        """Normalised text embeddings, and whether each caption was cut at ``max_tokens``."""
        # verbose=False: counting a caption longer than the model takes is the point, not a mistake.
        lengths = [len(ids) for ids in self.tokenizer(captions, truncation=False, verbose=False)["input_ids"]]
        batch = self.tokenizer(captions, padding="max_length", truncation=True, max_length=self.max_tokens,
                               return_tensors="pt")
        with self._autocast():
            out = self.model.get_text_features(input_ids=batch["input_ids"].to(self.device),
                                               attention_mask=batch["attention_mask"].to(self.device))
        out = getattr(out, "pooler_output", out)
        return torch.nn.functional.normalize(out.float(), dim=-1), [n > self.max_tokens for n in lengths]


def _label_column(label: str) -> str:
    """A classifier's label as a column name: ``No Watermark`` -> ``no_watermark``."""
    return re.sub(r"[^0-9a-z]+", "_", label.lower()).strip("_")


class ImageClassifier:
    """A transformers image classifier (``AutoModelForImageClassification``: ViT, SigLIP, ConvNeXt...)
    giving the probability of one of its labels per image: an NSFW or a watermark detector.

    ``spec`` is an alias (``nsfw``, ``watermark``: model and label) or ``MODEL:LABEL`` with MODEL a
    Hub id or a folder; the label is matched by its column name (case and punctuation aside). A Hub
    model (or alias) takes a revision as ``MODEL@REVISION`` (a commit, tag or branch), which
    pins what is loaded; the commit read is recorded either way."""

    def __init__(self, spec: str, *, device: str | None = None):
        from transformers import AutoConfig, AutoImageProcessor

        from curate.models import CLASSIFIER_LABELS, resolve_model, resolved_commit
        from curate.runner import resolve_device

        name, _, label = spec.rpartition(":") if ":" in spec else (spec, "", "")
        name, revision = _split_revision(name)
        label = label or CLASSIFIER_LABELS.get(name, "")
        if not label:
            raise CurateError(f"--classifier {spec}: name the label to score as MODEL:LABEL (aliases: "
                              f"{', '.join(sorted(CLASSIFIER_LABELS))})")
        try:
            ref = resolve_model(name, "classifier", revision)
        except CurateError as e:
            raise CurateError(f"--classifier {spec}: {e}") from None
        self.name, self.id, self.revision, self.device = name, ref.id, revision, resolve_device(device)
        self._problem = f"cannot load the image classifier {name!r} ({ref.id}{f' at {revision}' if revision else ''})"
        try:
            config = AutoConfig.from_pretrained(ref.id, revision=revision)
            self.processor = AutoImageProcessor.from_pretrained(ref.id, revision=revision)
        except (OSError, ValueError) as e:
            raise CurateError(f"{self._problem}: {e}") from None
        labels = {int(i): str(text) for i, text in (config.id2label or {}).items()}
        found = [i for i, text in labels.items() if _label_column(text) == _label_column(label)]
        if not found:
            raise CurateError(f"--classifier {spec}: {ref.id} has no label {label!r}; its labels are "
                              f"{', '.join(repr(t) for _, t in sorted(labels.items()))}")
        self.index, self.label, self.column = found[0], labels[found[0]], _label_column(label)
        # As transformers' image-classification pipeline reads a head: a regression head's value as it
        # is, a multi-label head's labels each on its own (sigmoid), as a one-logit head's (a softmax
        # over one logit is 1.0 for every image), the others' labels sharing one softmax.
        problem = config.problem_type
        self.activation = ("none" if problem == "regression" else
                           "sigmoid" if problem == "multi_label_classification" or config.num_labels == 1 else "softmax")
        # A one-logit or regression head was scored with a softmax before: its activation goes into
        # the stage config, so that such a stage is scored again; the others keep their hash.
        self._recorded_activation = problem == "regression" or (
            config.num_labels == 1 and problem != "multi_label_classification")
        self.commit = None if ref.local else resolved_commit(ref.id, revision, config)  # the Hub snapshot read
        self._model = None

    def record(self) -> dict[str, Any]:
        """What decides its column: a new snapshot of a Hub model, or a folder changed in place, is a new config."""
        from curate.models import local_fingerprint

        return {"model": self.name, "label": self.label, "column": self.column, "commit": self.commit,
                "local_model_files": local_fingerprint(self.id),
                **({"activation": self.activation} if self._recorded_activation else {})}

    def load(self) -> torch.nn.Module:
        if self._model is None:
            from transformers import AutoModelForImageClassification

            self._model = _load_frozen(AutoModelForImageClassification, self.id, self.revision, self.device,
                                       self._problem)
        return self._model

    def prepare(self, image: Any) -> torch.Tensor:
        """One PIL image as the model's input (what the decoding workers run)."""
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    @torch.no_grad()
    def probabilities(self, pixels: torch.Tensor) -> list[float]:
        with _gpu_bf16(self.device):
            logits = self.load()(pixel_values=pixels.to(self.device)).logits.float()
        scores = (logits if self.activation == "none" else logits.sigmoid() if self.activation == "sigmoid"
                  else logits.softmax(dim=-1))
        return scores[:, self.index].tolist()


def _split_revision(name: str) -> tuple[str, str | None]:
    """``org/model@v1.0`` -> (``org/model``, ``v1.0``); a folder whose name holds an @ stays whole."""
    if "@" not in name or os.path.isdir(name):
        return name, None
    name, _, revision = name.rpartition("@")
    return name, revision or None


def _gpu_bf16(device: torch.device, enabled: bool = True) -> Any:
    """bf16 autocast on a GPU, nothing on the CPU (the score models' forward passes)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def _load_frozen(cls: Any, model_id: str, revision: str | None, device: torch.device, problem: str) -> torch.nn.Module:
    """A transformers model in float32 on ``device``, in eval mode without gradients; a checkpoint
    that lacks weights (which transformers would initialise at random) is refused."""
    from curate.text import quiet_transformers

    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(model_id, revision=revision, dtype=torch.float32,
                                              output_loading_info=True)
    except (OSError, ValueError) as e:
        raise CurateError(f"{problem}: {e}") from None
    if info["missing_keys"]:
        raise CurateError(f"{problem}: its checkpoint lacks {len(info['missing_keys'])} weights "
                          f"({', '.join(sorted(info['missing_keys'])[:3])}...)")
    return model.to(device).eval().requires_grad_(False)


class ScoreStage(Stage):
    name = "score"
    version = 2  # 2: the good variants of a rejected caption row are scored too (1 scored ok rows only)
    with_tar = False
    packages = ("kiln", "torch", "transformers", "pillow", "polars")

    def __init__(self, images_dir: str | Path, *, model: str = "clip-score", revision: str | None = None,
                 captions_dir: str | Path | None = None, aesthetic: str | Path | None = None,
                 classifiers: list[str] = (), embeddings: bool = False, vqa: str | None = None,
                 batch_size: int = 64, decode_workers: int = 2, device: str | None = None):
        self.images_dir = storage.as_location(images_dir)  # a folder, or a URL
        self.captions_dir = storage.as_location(captions_dir) if captions_dir else None
        self.model_name, self.revision = model, revision
        self.aesthetic = Path(aesthetic) if aesthetic else None
        self.batch_size, self.decode_workers, self.device = max(1, batch_size), max(0, decode_workers), device
        # --model none: no CLIP (an NSFW filter over a crawl need not run CLIP ViT-L/14 as well).
        self.uses_clip = model != "none"
        if not self.uses_clip and (self.aesthetic or embeddings):
            raise CurateError("--aesthetic and --embeddings need CLIP: give --model (clip-score), not --model none")
        if not self.uses_clip and self.captions_dir and not vqa:
            raise CurateError("--captions are scored by CLIP or --vqa: give --model (clip-score) or --vqa, not "
                              "--model none alone")
        if not self.uses_clip and not classifiers and not vqa:
            raise CurateError("--model none leaves nothing to score: give a --classifier or --vqa")
        # Loaded at once (configs, processors and tokenizer; weights in prepare): the labels and the
        # embedding width decide the columns, and a model that cannot serve is named before any work.
        self.scorer = ClipScorer(model, revision=revision, device=device) if self.uses_clip else None
        self.classifiers = [ImageClassifier(spec, device=device) for spec in classifiers]
        self.vqa = None
        if vqa:
            name, revision = _split_revision(vqa)
            self.vqa = VqaScorer(name, revision=revision, device=device, batch_size=self.batch_size)
        self.embeddings = embeddings
        self.variants = ["orig", *self._caption_variants()] if self.uses_clip or self.vqa else []
        self.index_schema = {f"clip_{v}": pl.Float32 for v in self.variants} if self.uses_clip else {}
        if self.vqa is not None:
            self.index_schema |= {f"vqa_{v}": pl.Float32 for v in self.variants}
        if self.aesthetic is not None:
            self.index_schema["aesthetic"] = pl.Float32
        for classifier in self.classifiers:
            if classifier.column in self.index_schema or not classifier.column:
                raise CurateError(f"--classifier {classifier.name}: its column {classifier.column!r} is taken; "
                                  "score another label, or run it into another --out")
            self.index_schema[classifier.column] = pl.Float32
        if embeddings:  # for curate dedup; curate manifest --scores leaves the column out
            self.index_schema[EMBEDDING_COLUMN] = pl.Array(pl.Float32, self.scorer.dim)
        self.head: AestheticHead | None = None
        self.stream: ImageStream | None = None

    def _caption_variants(self) -> list[str]:
        if self.captions_dir is None:
            return []
        stage_of_kind(self.captions_dir, "recaption", "captions")
        shards = committed_shards(self.captions_dir)
        if not shards:
            raise CurateError(f"{self.captions_dir}: no caption shards (run curate recaption first)")
        columns = index_columns(shards[0].index_path, shards[0].index_bytes)
        return [c.removesuffix("_prompt_hash") for c in columns if c.endswith("_prompt_hash")]

    def config(self) -> dict[str, Any]:
        from curate.models import local_fingerprint

        return {"model": self.model_name, "revision": self.revision,
                "local_model_files": local_fingerprint(self.model_name), "variants": self.variants,
                "aesthetic": file_sha256(self.aesthetic) if self.aesthetic else None,
                # Only when given, so that the stages scored before classifiers existed keep their hash.
                **({"classifiers": [c.record() for c in self.classifiers]} if self.classifiers else {}),
                **({"embeddings": True} if self.embeddings else {}),
                **({"vqa": self.vqa.identity} if self.vqa else {})}

    def provenance(self) -> dict[str, Any]:
        return {"images": storage.resolved(self.images_dir),
                "captions": storage.resolved(self.captions_dir) if self.captions_dir else None,
                "aesthetic": str(self.aesthetic.resolve()) if self.aesthetic else None,
                # The commit is provenance, not config: recording it did not score existing stages again.
                **({"model_id": self.scorer.id, "model_commit": self.scorer.commit} if self.scorer else {}),
                **({"classifier_ids": [c.id for c in self.classifiers]} if self.classifiers else {}),
                **({"vqa_commit": self.vqa.commit} if self.vqa else {})}

    def plan(self) -> list[ShardTask]:
        return image_stage_tasks(self.images_dir, self.captions_dir)

    def prepare(self, todo: list[ShardTask]) -> None:
        self.head = AestheticHead.load(self.aesthetic) if self.aesthetic else None
        if self.head is not None:
            if self.head.input_dim != self.scorer.dim:
                raise CurateError(f"--aesthetic {self.aesthetic} takes {self.head.input_dim}-d image embeddings, but "
                                  f"{self.scorer.id} gives {self.scorer.dim}-d ones (the LAION predictor needs "
                                  "CLIP ViT-L/14: --model clip-score)")
            self.head = self.head.to(self.scorer.device).eval()
        # The decoding workers start first: they fill their queues while the weights load (and they
        # fork from a process that holds no model yet).
        # Each model has its own image processor: a worker prepares an image once for each.
        preparers = [m.prepare for m in [self.scorer, *self.classifiers, self.vqa] if m is not None]
        self.stream = ImageStream([(t.shard_id, t.payload[1]) for t in todo],
                                  functools.partial(_prepare_for_each, preparers), self.decode_workers,
                                  prefetch=2)  # 2 chunks of 8 ahead: 16 images per worker
        for model in [self.scorer, *self.classifiers, self.vqa]:
            if model is not None:
                model.load()

    def __exit__(self, *exc: object) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None

    def _captions(self, task: ShardTask) -> tuple[list[str], dict[str, dict[str, str]]]:
        """The image keys in order, and each one's caption per variant: the original where it is not
        blank, and every caption training reads (encode-latents' reading, rejected rows' good
        variants included), so that a score threshold judges what is trained on."""
        captions = read_image_captions(task, [v for v in self.variants if v != "orig"])
        return captions.keys, {k: ({"orig": c} if (c := captions.originals[k]) and c.strip() else {})
                                  | captions.accepted[k] for k in captions.keys}

    def process(self, task: ShardTask, writer: ShardWriter, progress: Callable[[int], None]) -> None:
        keys, captions = self._captions(task)
        rows: dict[str, dict[str, Any]] = {}
        batch: list[tuple[str, tuple[torch.Tensor, ...]]] = []
        for key, pixels, error in self.stream.take(task.shard_id, len(keys)):
            if error is not None:
                rows[key] = {"reason": "unreadable", "detail": error}
                progress(1)
                continue
            batch.append((key, pixels))
            if len(batch) == self.batch_size:
                rows |= self._score(batch, captions)
                progress(len(batch))
                batch = []
        if batch:
            rows |= self._score(batch, captions)
            progress(len(batch))
        for key in keys:
            row = rows[key]
            if "reason" in row:
                writer.reject(key, row["reason"], detail=row["detail"])
            else:
                writer.add(key, {}, row={c: row[c] for c in self.index_schema}, flags=row["flags"])

    def finalize(self, out_dir: Path | str, tasks: list[ShardTask]) -> dict[str, Any]:
        """Each score's spread over the dataset, to choose thresholds from (``curate stats`` prints it)."""
        scores = [c for c, dtype in self.index_schema.items() if dtype == pl.Float32]
        tables = storage.parallel_map(lambda s: read_index(s.index_path, scores, s.index_bytes), committed_shards(out_dir),
                                      storage.is_remote(out_dir))  # URLs: many at a time
        table = pl.concat(list(tables), how="vertical_relaxed")
        summary = {}
        for column in scores:
            values = table[column].drop_nulls()
            if len(values):
                summary[column] = {"samples": len(values),
                                   **{f"p{q}": rounded(float(values.quantile(q / 100, "linear")))
                                      for q in (5, 25, 50, 75, 95)}}
        return summary

    def _score(self, batch: list[tuple[str, tuple[torch.Tensor, ...]]], captions: dict[str, dict[str, str]]
               ) -> dict[str, dict]:
        """Each image's row; ``batch`` holds each image's inputs for CLIP (when used), each classifier, then
        VQAScore's model (when used)."""
        rows = {key: {"flags": [], **dict.fromkeys(self.index_schema)} for key, _ in batch}
        inputs = list(zip(*(pixels for _, pixels in batch), strict=True))  # per model, the batch's inputs
        pairs = [(i, key, v, text) for i, (key, _) in enumerate(batch) for v, text in captions[key].items()]
        if self.scorer is not None:
            images = self.scorer.images(torch.stack(inputs.pop(0)))
            if self.head is not None:
                with torch.no_grad():
                    for (key, _), value in zip(batch, self.head(images).tolist(), strict=True):
                        rows[key]["aesthetic"] = value
            if self.embeddings:
                for (key, _), embedding in zip(batch, images.tolist(), strict=True):
                    rows[key][EMBEDDING_COLUMN] = embedding
            if pairs:
                texts, truncated = self.scorer.texts([text for *_, text in pairs])
                similarity = (images[[i for i, *_ in pairs]] * texts).sum(dim=-1).tolist()
                for (_, key, v, _), value, cut in zip(pairs, similarity, truncated, strict=True):
                    rows[key][f"clip_{v}"] = value
                    if cut:
                        rows[key]["flags"].append(f"{v}_truncated")
        for classifier in self.classifiers:
            for (key, _), value in zip(batch, classifier.probabilities(torch.stack(inputs.pop(0))), strict=True):
                rows[key][classifier.column] = value
        if self.vqa is not None and pairs:  # does each caption describe its image?
            pictures = inputs.pop(0)
            scores = self.vqa([pictures[i] for i, *_ in pairs], [text for *_, text in pairs])
            for (_, key, v, _), value in zip(pairs, scores[:, 0].tolist(), strict=True):
                rows[key][f"vqa_{v}"] = value
        return rows


def _prepare_for_each(preparers: list[Callable[[Any], torch.Tensor]], image: Any) -> tuple[torch.Tensor, ...]:
    """One decoded image as each model's input (in a decoding worker)."""
    return tuple(prepare(image) for prepare in preparers)
