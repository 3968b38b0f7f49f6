"""`curate score` against the bare CLIP forward passes, measured in one run.

The whole stage (read the image shards, decode and prepare the images in DataLoader workers, read
the captions, embed images and captions, write the tables) against the bare model on the same
images already prepared as tensors and the same captions, with the same batches: the image tower
on the batch, the text tower on its captions. The model is the full-size CLIP ViT-L/14
architecture (``--model clip-score``), randomly initialised, so that compute weighs as it does
in practice. The stage's rate is steady: from the end of its model loading to its end (commits
and the final pass included); the bare pass is timed warm. The stage's scores are checked
against the bare pass's.

With ``--classifier``: the stage with ``--model none --classifier`` (an NSFW classifier alone)
against the bare classifier, the full-size ViT-B/16 at 224 px of Falconsai/nsfw_image_detection.

    python bench/score.py [--classifier] [--images 24] [--batch-size 8] [--workers 2] [--repeats 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest import make_images  # noqa: E402

from curate.cli import main as curate_main  # noqa: E402
from curate.runner import run_stage  # noqa: E402
from curate.score import ClipScorer, ImageClassifier, ScoreStage  # noqa: E402
from curate.shards import committed_shards, iter_tar_samples  # noqa: E402
from curate.tiny import _clip_vocab_and_merges  # noqa: E402


def full_size_clip(folder: Path) -> Path:
    """CLIP ViT-L/14 at 224 px (openai/clip-vit-large-patch14's shapes), random weights, with a
    small tokenizer of CLIP's form (token ids within the real vocabulary's size)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    config = CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                     "num_attention_heads": 12, "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 1},
        vision_config={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                       "num_attention_heads": 16, "image_size": 224, "patch_size": 14},
        projection_dim=768)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(folder)
    CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77).save_pretrained(folder)
    return folder


def full_size_vit_classifier(folder: Path) -> Path:
    """ViT-B/16 at 224 px with the labels normal and nsfw (Falconsai/nsfw_image_detection's shapes),
    random weights."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(image_size=224, patch_size=16, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, num_labels=2, id2label={0: "normal", 1: "nsfw"},
                       label2id={"normal": 0, "nsfw": 1})
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(folder)
    return folder


class _TimedStage(ScoreStage):
    def prepare(self, todo) -> None:  # noqa: ANN001 (the runner's signature)
        super().prepare(todo)
        self.ready = time.perf_counter()


def stage_run(images: Path, model: Path, out: Path, batch: int, workers: int, device: str,
              classifier: bool) -> tuple[float, float]:
    """(seconds in all, steady seconds: from the model loaded to the end)."""
    shutil.rmtree(out, ignore_errors=True)
    models = {"model": "none", "classifiers": [f"{model}:nsfw"]} if classifier else {"model": str(model)}
    stage = _TimedStage(images, **models, batch_size=batch, decode_workers=workers, device=device)
    start = time.perf_counter()
    run_stage(stage, out, progress=False)
    end = time.perf_counter()
    return end - start, end - stage.ready


def bare_run(images: Path, model: Path, batch: int, device: str, classifier: bool) -> tuple[float, dict[str, float]]:
    """Seconds of the bare forward passes over every image and its caption, warm; the scores by key."""
    from PIL import Image

    from curate.images import to_rgb

    scorer = ImageClassifier(f"{model}:nsfw", device=device) if classifier else ClipScorer(str(model), device=device)
    keys, pixels, captions = [], [], []
    for shard in committed_shards(images):
        index = pl.read_parquet(shard.index_path).filter(pl.col("status") == "ok")
        caption = dict(zip(index["key"], index["caption"], strict=True))
        for key, members in iter_tar_samples(shard.tar_path):
            import io

            with Image.open(io.BytesIO(members["jpg"])) as img:
                pixels.append(scorer.prepare(to_rgb(img)))
            keys.append(key)
            captions.append(caption[key])
    batches = [(torch.stack(pixels[i: i + batch]), captions[i: i + batch]) for i in range(0, len(keys), batch)]

    def one(x: torch.Tensor, texts: list[str]) -> list[float]:
        if classifier:
            return scorer.probabilities(x)
        image, (text, _) = scorer.images(x), scorer.texts(texts)
        return (image * text).sum(-1).tolist()

    one(*batches[0])  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    scores = [s for x, texts in batches for s in one(x, texts)]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, dict(zip(keys, scores, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--side", type=int, default=512, help="width of the 4:3 JPEGs")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="the stage's decoding workers")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--classifier", action="store_true", help="an NSFW classifier alone (ViT-B/16), not CLIP")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_images(tmp / "src", args.images, args.side)
        assert curate_main(["ingest", str(tmp / "src"), "--out", str(tmp / "images"), "--shard-size",
                            str(max(1, args.images // 3)), "--workers", "2", "--no-progress"]) == 0
        model = full_size_vit_classifier(tmp / "vit") if args.classifier else full_size_clip(tmp / "clip")
        column = "nsfw" if args.classifier else "clip_orig"
        stage_times, bare_times, worst = [], [], 0.0
        for _ in range(args.repeats):
            stage_times.append(stage_run(tmp / "images", model, tmp / "out", args.batch_size, args.workers,
                                         args.device, args.classifier))
            seconds, expected = bare_run(tmp / "images", model, args.batch_size, args.device, args.classifier)
            bare_times.append(seconds)
            rows = pl.concat([pl.read_parquet(s.index_path) for s in committed_shards(tmp / "out")])
            for key, value in zip(rows["key"], rows[column], strict=True):
                worst = max(worst, abs(value - expected[key]))
            print(f"  stage {stage_times[-1][0]:.1f} s ({stage_times[-1][1]:.1f} steady), bare {seconds:.1f} s",
                  file=sys.stderr, flush=True)
    n = args.images
    steady = statistics.median(s for _, s in stage_times)
    whole = statistics.median(s for s, _ in stage_times)
    bare = statistics.median(bare_times)
    print(f"\n{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores, device {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{'ViT-B/16 classifier alone' if args.classifier else 'CLIP ViT-L/14'}; {n} JPEGs of {args.side} x "
          f"{args.side * 3 // 4}, batch {args.batch_size}, {args.workers} decoding workers; median of {args.repeats}; "
          f"{time.perf_counter() - started:.0f} s in all\n")
    print("| run | seconds | each run | images/s |")
    print("| --- | ---: | --- | ---: |")
    print(f"| stage, whole (model loading included) | {whole:.2f} | {', '.join(f'{s:.2f}' for s, _ in stage_times)} "
          f"| {n / whole:.2f} |")
    print(f"| stage, steady | {steady:.2f} | {', '.join(f'{s:.2f}' for _, s in stage_times)} | {n / steady:.2f} |")
    bare_name = "bare classifier" if args.classifier else "bare image and text towers"
    print(f"| {bare_name} (prepared tensors) | {bare:.2f} | {', '.join(f'{s:.2f}' for s in bare_times)} "
          f"| {n / bare:.2f} |")
    print(f"\nsteady stage / bare: **{bare / steady:.2f}**; largest difference between their scores: {worst:.2e}")


if __name__ == "__main__":
    main()
