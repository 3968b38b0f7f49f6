"""`curate encode-text` against the bare text encoder and against a naive loop, measured in one run.

The encoder is T5Gemma-2B's (hidden 2304, 8 query and 4 key/value heads of 256, GeGLU MLP
9216) with 2 of its 26 layers (--layers), randomly initialised, and the tiny Gemma tokenizer of
curate.tiny; captions are English-like, about 60 words long and 12 words short, on latent
shards written as `curate encode-latents` writes them (tests/latent_data.py).

1. Stage / bare: the whole stage (read the captions from the latent tars and clean them in
   worker processes, tokenize, sort by length, encode, serialise, commit) against the bare
   encoder on the same token batches, timed warm. Two rates for the stage: over the whole
   run, and steady (from its first encoder call to its end: without loading the encoder,
   which a run of millions of captions pays once).
2. Stage / naive: against the loop people write first: for each sample and caption, read,
   clean, encode alone padded to max_tokens (as the trainer and PRXPipeline pad), and
   `torch.save` the valid rows to one file.

Both with Gemma's tokenizer as it is (it pads on the left, so the stage pads every batch to
max_tokens as the pipeline does) and with the same tokenizer set to pad on the right (the stage
then pads each batch to its longest caption).

    python bench/encode_text.py [--samples 32] [--shards 2] [--layers 2] [--max-tokens 256] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]
sys.path.append(str(Path(__file__).resolve().parent))

from gpu_train import T5GEMMA_2B, build_t5gemma  # noqa: E402
from latent_data import make_latent_dataset  # noqa: E402

from curate.encode_text import EncodeTextStage, read_captions  # noqa: E402
from curate.runner import run_stage  # noqa: E402
from curate.shards import OK, committed_shards, read_index  # noqa: E402
from curate.text import TextEncoder, clean_caption  # noqa: E402

WORDS = ("a red fox sits in fresh snow beside an old wooden fence while soft morning light falls "
         "across the frozen field and distant pine trees under a pale blue winter sky with thin "
         "clouds drifting slowly over quiet hills where a small stone cottage stands near the river "
         "its chimney smoking gently as two children in bright coats walk along the path").split()


def caption(variant: str, i: int) -> str:
    rng = np.random.default_rng([i, len(variant)])
    n = {"long": 60, "short": 12}.get(variant, 20) + int(rng.integers(-5, 6))
    return " ".join(WORDS[int(k)] for k in rng.integers(0, len(WORDS), n)).capitalize() + "."


def right_padding_copy(folder: Path, out: Path) -> Path:
    shutil.copytree(folder, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "right"}))
    return out


def timed_stage(latents: Path, encoder: Path, out: Path, args: argparse.Namespace) -> dict[str, float]:
    """The whole stage; ``steady`` from its first encoder call on."""
    stage = EncodeTextStage(latents, out, str(encoder), max_tokens=args.max_tokens, batch_size=args.batch_size,
                            workers=args.workers, manifest_dir=out.parent / "manifests", device="cpu")
    stage.input_manifests = []  # the manifests are not part of the timing
    first = []
    encode = stage.encode

    def timed_encode(ids):
        first.append(first[0] if first else time.perf_counter())
        return encode(ids)

    stage.encode = timed_encode
    start = time.perf_counter()
    run_stage(stage, out, progress=False)
    end = time.perf_counter()
    return {"whole": end - start, "steady": end - first[0], "workers": stage.workers}


def shard_tokens(latents: Path, encoder: TextEncoder) -> list[list[list[int]]]:
    """Per shard, the stage's token batches: its captions cleaned, tokenized, longest first."""
    shards = []
    for shard in committed_shards(latents):
        index = read_index(shard.index_path, ["key", "status"])
        captions = read_captions(str(shard.tar_path), index.filter(index["status"] == OK)["key"].to_list())
        ids, _ = encoder.tokenize_ids([t for per_key in captions for t in per_key.values()])
        shards.append(sorted(ids, key=len, reverse=True))
    return shards


def timed_bare(shards: list[list[list[int]]], encoder: TextEncoder, batch_size: int) -> float:
    encoder.encode_ids(shards[0][:batch_size])  # warm
    start = time.perf_counter()
    for ids in shards:
        for i in range(0, len(ids), batch_size):
            encoder.encode_ids(ids[i: i + batch_size])
    return time.perf_counter() - start


def timed_naive(latents: Path, encoder: TextEncoder, out: Path) -> float:
    from curate.shards import iter_tar_samples

    out.mkdir(parents=True)
    start = time.perf_counter()
    for shard in committed_shards(latents):
        for key, members in iter_tar_samples(shard.tar_path, wanted=lambda k, ext: ext.endswith(".txt")):
            for ext, data in members.items():
                text = data.decode()
                if text.strip():
                    context, mask = encoder.encode([clean_caption(text)], clean=False)
                    torch.save(context[0][mask[0]].to(torch.bfloat16).clone(), out / f"{key}.{ext[:-4]}.pt")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2, help="of T5Gemma-2B's 26")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each, interleaved; medians reported")
    parser.add_argument("--workers", type=int, default=None,
                        help="the stage's caption-reading processes (default: the stage's, 0 on a CPU)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="kiln-bench-text-") as tmp_name:
        tmp = Path(tmp_name)
        data = make_latent_dataset(tmp / "data", shards=args.shards, per_shard=args.samples // args.shards,
                                   sizes=[(2, 2)], caption=caption)
        left = build_t5gemma(tmp / "t5gemma-left", T5GEMMA_2B, args.layers)
        encoders = {"left": left, "right": right_padding_copy(left, tmp / "t5gemma-right")}
        print(f"# encode-text, CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads)\n")
        print(f"{args.samples} samples in {args.shards} shards, a long, a short and an original caption each; "
              f"T5Gemma-2B shapes with {args.layers} layers; max_tokens {args.max_tokens}; batch {args.batch_size}; "
              f"caption workers: {args.workers if args.workers is not None else 'the default'}; bare, stage and "
              f"naive interleaved, {args.repeats} runs each, medians (each run's rate in brackets)\n")
        print("| tokenizer pads | tokens per caption (mean) | stage captions/s: whole, steady | bare captions/s "
              "| naive captions/s | stage / bare: steady (whole) | stage / naive: steady (whole) |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for side, folder in encoders.items():
            encoder = TextEncoder.load(str(folder), max_tokens=args.max_tokens)
            shards = shard_tokens(data["latents"], encoder)
            captions = sum(len(s) for s in shards)
            tokens = sum(len(i) for s in shards for i in s) / captions
            runs: dict[str, list[float]] = {"whole": [], "steady": [], "bare": [], "naive": []}
            for r in range(args.repeats):
                runs["bare"].append(timed_bare(shards, encoder, args.batch_size))
                stage = timed_stage(data["latents"], folder, tmp / f"stage-{side}-{r}" / "t5", args)
                runs["whole"].append(stage["whole"])
                runs["steady"].append(stage["steady"])
                runs["naive"].append(timed_naive(data["latents"], encoder, tmp / f"naive-{side}-{r}"))
            t = {k: statistics.median(v) for k, v in runs.items()}

            def rates(k: str, captions: int = captions, runs: dict = runs, t: dict = t) -> str:
                return f"{captions / t[k]:.2f} ({', '.join(f'{captions / x:.2f}' for x in runs[k])})"

            print(f"| {side} | {tokens:.1f} | {rates('whole')}; {rates('steady')} | {rates('bare')} | "
                  f"{rates('naive')} | **{t['bare'] / t['steady']:.2f}** ({t['bare'] / t['whole']:.2f}) | "
                  f"**{t['naive'] / t['steady']:.2f}x** ({t['naive'] / t['whole']:.2f}x) |", flush=True)
            del encoder


if __name__ == "__main__":
    main()
