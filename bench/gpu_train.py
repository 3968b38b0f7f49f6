"""Training throughput on one GPU: images/s and MFU of the prx-1.2b preset at 256 px (Flux
latents, 16 x 32 x 32), bf16 autocast with fp32 weights and AdamW, as `train` runs it, fed

  (a) by the real data path: latent shards written to local disk first (tests/latent_data.py,
      stored as bf16 distributions, a fresh draw per sample), 4 DataLoader workers, pinned;
  (b) by the same step batches held in memory (pinned), through ``train(data=...)``;
  (c) with --feeds text: by the real shards plus text shards of stored caption embeddings (as
      `curate encode-text` writes them; random values of the encoder's width, about the token
      counts of real captions), so that no step runs the text encoder. Against (a) with
      --text-layers 26 (T5Gemma-2B's full encoder) this is what precomputing text saves;
  (d) with --ablations muon,ema,x-pred,tread: the memory-fed run (b) again with each ablation
      switched on (train --ablation NAME): what Muon's Newton-Schulz steps and the EMA update cost
      per step, and what TREAD's routing saves. ``repa`` and ``irepa`` are compared with the shard-fed run (a)
      instead: it reads the originals too, from an image stage of noise JPEGs written beside the
      shards (tests/latent_data.add_image_stage), and runs a teacher of DINOv3 ViT-B/16's shape
      (randomly initialised: its FLOPs, not its features) every step.
  (e) with --latents pixels: every run in pixel space instead (`curate encode-latents --vae
      pixels`: 3 x 512 x 512 uint8 samples, PRX's speedrun geometry of 32 px patches through a
      256-wide bottleneck: the same 256 tokens as Flux latents at 256 px), so the memory-fed run
      against the Flux one's figures says what pixel space costs per step; --ablations lpips,pdino
      then time its perceptual losses (a VGG16 and a DINOv2-B/14 with registers, randomly
      initialised, run on the clean-image estimate each step).

MFU is the trainer's own (metrics.jsonl: train.model's counted forward + backward FLOPs per
sample over the data-sheet bf16 peak), also given against the dense bf16 matmul rate measured
in the same run (as bench/gpu_vae.py). Goal: MFU >= 35%.

Realism and its limits:
- Text encoder: T5Gemma's encoder at the real width (hidden 2304, so the denoiser's
  context_in_dim and context projection are PRX-1.2B's), its real head layout and MLP, but 2
  layers instead of 26 and the tiny Gemma tokenizer of curate.tiny, randomly initialised and
  saved like curate.tiny.build_tiny_t5gemma. Its cost is not part of PRX's MFU; the header
  prints what it costs per sample, counted, so the full encoder's cost can be scaled from it.
- Shuffle blocks of 2 micro-batches (data.shuffle_buffer), so every stream reads its shards
  every other batch and the timed steps read as many samples as they consume (with the
  preset's 1000-sample blocks all reading would fall in the warm-up steps).
- Checkpoints are not written (patched out): the final one of a 1.2B run with AdamW state
  (about 14 GB) would take longer than the timed steps.

    python bench/gpu_train.py [--steps 10] [--warmup 3] [--global-batch 256] [--micro-batch 32]
    python bench/gpu_train.py --eager --feeds memory   # without torch.compile (the preset compiles)
    python bench/gpu_train.py --feeds memory --ablations muon,ema,tread   # the ablations' cost per step
    python bench/gpu_train.py --feeds memory --latents pixels --ablations x-pred,lpips,pdino
    python bench/gpu_train.py --smoke     # CPU, tiny preset and a narrow encoder: the code path

On the lent GPU machines run it through bench/gpu.sh, which installs the carried wheels.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

# The repository ahead of bench/: bench/train.py would otherwise shadow the train package.
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]
sys.path.append(str(Path(__file__).resolve().parent))

from latent_data import add_image_stage, add_text_shards, make_latent_dataset  # noqa: E402

import train.trainer as trainer  # noqa: E402
from curate.manifest import load_manifest  # noqa: E402
from train.config import TrainConfig, build_config  # noqa: E402
from train.data import LatentLoader, StepBatch  # noqa: E402
from train.metrics import read_metrics  # noqa: E402
from train.model import peak_tflops  # noqa: E402

# The ablations that align with a teacher: they read the originals, so they are fed by shards.
ALIGNED = {"repa", "irepa"}
# T5Gemma-2B's encoder (google/t5gemma-2b-2b-ul2), but for the layer count.
T5GEMMA_2B = {"hidden_size": 2304, "intermediate_size": 9216, "num_attention_heads": 8,
              "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256}
NARROW = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
          "num_key_value_heads": 1, "head_dim": 32, "query_pre_attn_scalar": 32}


def build_t5gemma(folder: Path, sizes: dict[str, int], layers: int, seed: int = 0) -> Path:
    """A randomly initialised T5Gemma encoder of ``sizes`` and ``layers``, saved as
    curate.tiny.build_tiny_t5gemma saves its tiny one (bare T5GemmaEncoder weights, composite
    config, Gemma-style tokenizer), in bf16 to halve the write."""
    from transformers import T5GemmaConfig
    from transformers.models.t5gemma.modeling_t5gemma import T5GemmaEncoder

    from curate.tiny import _quiet_transformers, _tiny_gemma_tokenizer

    tok = _tiny_gemma_tokenizer()
    module = {"vocab_size": -(-len(tok) // 64) * 64, **sizes, "num_hidden_layers": layers,
              "sliding_window": 4096, "max_position_embeddings": 8192, "pad_token_id": 0,
              "eos_token_id": 1, "bos_token_id": 2}
    composite = T5GemmaConfig(encoder=module, decoder=module, vocab_size=module["vocab_size"],
                              is_encoder_decoder=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5GemmaEncoder(composite.encoder).eval().to(torch.bfloat16)
    with _quiet_transformers():
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    composite.architectures = ["T5GemmaEncoder"]
    composite.save_pretrained(folder)
    return folder


def text_flops_per_sample(folder: Path, max_tokens: int, device: torch.device) -> float:
    """Forward FLOPs of the text encoder for one caption padded to ``max_tokens``, counted."""
    from torch.utils.flop_counter import FlopCounterMode

    from curate.text import TextEncoder

    text = TextEncoder.load(str(folder), device=device, max_tokens=max_tokens)
    with FlopCounterMode(display=False) as counter:
        text.encode(["a photograph of a red fox sitting in fresh snow"])
    del text
    return float(counter.get_total_flops())


def bf16_peak() -> float:
    from gpu_vae import bf16_peak as measure

    return measure("cuda")


def build_dinov3_base(folder: Path, seed: int = 0) -> Path:
    """A randomly initialised DINOv3 ViT-B/16 (facebook/dinov3-vitb16-pretrain-lvd1689m's shape) with
    its image processor, saved like curate.tiny.build_tiny_dinov3 saves the tiny one."""
    from transformers import DINOv3ViTConfig, DINOv3ViTImageProcessorFast, DINOv3ViTModel

    from curate.tiny import IMAGENET_MEAN, IMAGENET_STD

    config = DINOv3ViTConfig(patch_size=16, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, num_register_tokens=4, layerscale_value=1.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DINOv3ViTModel(config).eval()
    model.save_pretrained(folder)
    DINOv3ViTImageProcessorFast(size={"height": 256, "width": 256}, image_mean=IMAGENET_MEAN,
                                image_std=IMAGENET_STD).save_pretrained(folder)
    return folder


def build_dinov2_reg_base(folder: Path, seed: int = 0) -> Path:
    """A randomly initialised DINOv2-B/14 with registers (facebook/dinov2-with-registers-base's shape,
    P-DINO's network) with its image processor, saved like curate.tiny saves the tiny one."""
    from transformers import BitImageProcessor, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    from curate.tiny import IMAGENET_MEAN, IMAGENET_STD

    config = Dinov2WithRegistersConfig(patch_size=14, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                       image_size=518, num_register_tokens=4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Dinov2WithRegistersModel(config).eval()
    model.save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
                      image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD).save_pretrained(folder)
    return folder


def cache_random_vgg16(home: Path, seed: int = 0) -> None:
    """VGG16's features, randomly initialised, where torch.hub keeps torchvision's ImageNet checkpoint,
    and TORCH_HOME pointed there: LPIPS loads them as it would the real ones (train.perceptual)."""
    import os

    from train.perceptual import VGG16_URL, vgg16_features

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        features = vgg16_features()
    (home / "hub" / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()},
               home / "hub" / "checkpoints" / Path(VGG16_URL).name)
    os.environ["TORCH_HOME"] = str(home)


def config(args: argparse.Namespace, manifest: Path, out: Path, text: Path,
           ablations: list[str] | None = None, extra: dict[str, Any] | None = None) -> TrainConfig:
    settings = {**(extra or {}), "text_encoder": str(text), "steps": args.warmup + args.steps,
                "global_batch": args.global_batch, "micro_batch": args.micro_batch,
                "data.workers": args.workers, "data.shuffle_buffer": 2 * args.micro_batch,
                "log.every": 1, "log.tensorboard": False, "sample_every": 0,
                "checkpoint_every": args.warmup + args.steps, "compile": not args.eager}
    return build_config(args.preset, overrides=[f"{k}={v}" for k, v in settings.items()],
                        ablations=ablations, shards=str(manifest), out=str(out))


def collect(cfg: TrainConfig, pin: bool) -> list[StepBatch]:
    """The step batches train() reads for ``cfg``, read once into (pinned) memory."""
    settings = trainer.data_settings(cfg)  # exactly the settings train() reads with
    batches = []
    with LatentLoader(load_manifest(cfg.shards), cfg.shards, settings) as loader:
        for batch, _ in zip(loader, range(cfg.steps), strict=False):
            micro = [dataclasses.replace(m, latents=m.latents.pin_memory() if pin else m.latents.clone())
                     for m in batch.micro]
            batches.append(StepBatch(batch.step, micro))
    return batches


def run(cfg: TrainConfig, warmup: int, data: Any = None) -> dict[str, float]:
    """train() once; images/s, MFU, data wait and peak memory over the steps after ``warmup``."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    captured = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stderr(captured):
            trainer.train(cfg, data=data)
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise
    wall = time.perf_counter() - start
    timed = [m for m in read_metrics(cfg.out) if m["step"] > warmup]
    seconds = [cfg.global_batch / m["images_per_s"] for m in timed]
    images_per_s = cfg.global_batch * len(timed) / sum(seconds)
    out = {"images_per_s": images_per_s, "step_s": statistics.median(seconds),
           "wait": sum(s * m["data_wait_share"] for s, m in zip(seconds, timed, strict=True)) / sum(seconds),
           "memory_gb": max(m["peak_memory_gb"] for m in timed), "steps": len(timed), "wall": wall,
           "loss": timed[-1]["loss"]}
    if all("mfu" in m for m in timed):
        per_image = statistics.mean(m["mfu"] / m["images_per_s"] for m in timed)  # constant
        out["mfu"] = per_image * images_per_s
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny preset, narrow encoder, 3 steps")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--per-shard", type=int, default=64)
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--eager", action="store_true", help="compile=false (the preset compiles the denoiser)")
    parser.add_argument("--workdir", default=None, help="local disk for shards (default: a temp dir)")
    parser.add_argument("--feeds", default="shards,memory",
                        help="which runs, comma-separated: shards, memory, text (shards with stored text embeddings)")
    parser.add_argument("--ablations", default="",
                        help="comma-separated train --ablation names, each a further run fed from memory")
    parser.add_argument("--latents", choices=["flux", "pixels"], default="flux",
                        help="flux: 16 x 32 x 32 latents (256 px); pixels: 3 x 512 x 512 images, 32 px patches")
    args = parser.parse_args()
    feeds = args.feeds.split(",")
    if not feeds or set(feeds) - {"shards", "memory", "text"}:
        parser.error(f"--feeds takes shards, memory and text, comma-separated, not {args.feeds!r}")
    ablations = [a for a in args.ablations.split(",") if a]
    if ALIGNED & set(ablations) and "shards" not in feeds:
        parser.error("--ablations repa and irepa compare against the shard-fed run: add shards to --feeds")
    if set(ablations) - ALIGNED and "memory" not in feeds:
        parser.error("--ablations compares against the memory-fed run: add memory to --feeds")
    pixels = args.latents == "pixels"
    if {"lpips", "pdino"} & set(ablations) and not pixels:
        parser.error("--ablations lpips and pdino need --latents pixels")
    args.preset = "prx-1.2b"
    sizes = T5GEMMA_2B
    if args.smoke:
        args.preset, sizes = "tiny", NARROW
        args.steps, args.warmup, args.global_batch, args.micro_batch = 2, 1, 8, 4
        args.workers, args.shards, args.per_shard = 2, 4, 16
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        raise SystemExit("no CUDA device: run with --smoke to check the code path on a CPU")
    device = torch.device("cuda" if cuda else "cpu")
    trainer.save_checkpoint = lambda *a, **k: None  # see the module docstring

    started = time.perf_counter()
    import diffusers

    measured = bf16_peak() if cuda else None
    table = peak_tflops(device)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        side = (64 if args.smoke else 512) if pixels else 256
        if pixels:  # PRX's speedrun: 32 px patches through a 256-wide bottleneck
            data = make_latent_dataset(tmp / "latents", shards=args.shards, per_shard=args.per_shard, channels=3,
                                       sizes=[(side, side)], stored="mean", dtype="uint8", vae_dir="pixels")
            base = {"model.patch_size": 32, "model.bottleneck_size": 256}
        else:
            data = make_latent_dataset(tmp / "latents", shards=args.shards, per_shard=args.per_shard,
                                       channels=16, sizes=[(32, 32)], stored="dist", dtype="bfloat16")
            base = {}
        written = time.perf_counter() - t0
        text = build_t5gemma(tmp / "t5gemma", sizes, args.text_layers)
        probe = config(args, data["mix"], tmp / "probe", text, extra=base)
        text_flops = text_flops_per_sample(text, probe.max_tokens, device)
        device_name = torch.cuda.get_device_name() if cuda else "CPU (--smoke)"
        print(f"# bench/gpu_train.py on {device_name}, torch {torch.__version__}, diffusers "
              f"{diffusers.__version__}; {args.preset} preset, {side} px "
              f"{'pixels (32 px patches, bottleneck 256)' if pixels else 'Flux latents'}, global batch {args.global_batch}, "
              f"micro-batch {args.micro_batch}, {args.steps} timed steps after {args.warmup}"
              f"{', eager' if args.eager else ', torch.compile'}")
        print(f"# bf16 peak: data sheet {table or '-'} TFLOP/s, measured (8192^3 matmul) "
              f"{f'{measured / 1e12:.0f}' if measured else '-'} TFLOP/s; shards: {args.shards} x "
              f"{args.per_shard} samples written in {written:.0f} s; text encoder T5Gemma "
              f"hidden {sizes['hidden_size']}, {args.text_layers} layers, {probe.max_tokens} tokens: "
              f"{text_flops / 1e9:.3g} GFLOP/sample forward (about {text_flops / 1e9 * 26 / args.text_layers:.3g} "
              "with T5Gemma-2B's 26 layers)", flush=True)
        print("| fed by | images/s | s/step (median) | data wait | MFU (data-sheet peak) | "
              "MFU (measured peak) | GFLOP/sample | peak memory GB | run s |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", flush=True)
        results = {}
        manifests = {"shards": data["mix"], "memory": data["mix"]}
        if "text" in feeds:
            manifests["text"] = add_text_shards(data, text, dim=sizes["hidden_size"], max_tokens=probe.max_tokens)["mix"]
        memory = f"same step batches in memory{' (pinned)' if cuda else ''}"
        runs = [("shards", f"real shards on local disk ({args.workers} workers)"), ("memory", memory),
                ("text", "real shards and stored text embeddings (no text encoder per step)")]
        runs += [(f"ablation {name}", f"{memory}, --ablation {name}") for name in ablations if name not in ALIGNED]
        extra: dict[str, dict[str, Any]] = {}  # per ablation: the settings its run adds to the base ones
        if "lpips" in ablations:
            cache_random_vgg16(tmp / "torch_home")
        if "pdino" in ablations:
            extra["pdino"] = {"perceptual.dino_encoder": str(build_dinov2_reg_base(tmp / "dinov2-reg")),
                              **({"perceptual.dino_size": 28} if args.smoke else {})}
        if ALIGNED & set(ablations):
            t0 = time.perf_counter()
            images = add_image_stage(data)
            teacher = {"repa.encoder": str(build_dinov3_base(tmp / "dinov3"))}
            print(f"# REPA: {sum(1 for _ in images.glob('*.tar'))} image shards of noise JPEGs and a random "
                  f"DINOv3 ViT-B/16 written in {time.perf_counter() - t0:.0f} s", flush=True)
            for name in sorted(ALIGNED & set(ablations), key=ablations.index):
                extra[name] = teacher
                runs.append((f"ablation {name}",
                             f"real shards and their images ({args.workers} workers), --ablation {name}"))
        for key, label in runs:
            if key.split(" ")[0] not in feeds and not key.startswith("ablation"):
                continue
            ablation = key.removeprefix("ablation ") if key.startswith("ablation") else None
            cfg = config(args, manifests.get(key, data["mix"]), tmp / key.replace(" ", "-"), text,
                         ablations=[ablation] if ablation else None, extra={**base, **extra.get(ablation, {})})
            source = None
            if key == "memory":
                batches = collect(cfg, pin=cuda)
            if key == "memory" or (ablation and ablation not in ALIGNED):
                source = lambda start, rank, b=batches: iter(b[start:])  # noqa: E731
            r = results[key] = run(cfg, args.warmup, source)
            mfu = r.get("mfu")
            flops = mfu * table * 1e12 / r["images_per_s"] if mfu and table else None
            print(f"| {label} | {r['images_per_s']:.1f} | {r['step_s']:.3f} | {r['wait']:.1%} | "
                  f"{f'{mfu:.1%}' if mfu else '-'} | "
                  f"{f'{mfu * table * 1e12 / measured:.1%}' if mfu and measured else '-'} | "
                  f"{f'{flops / 1e9:.0f}' if flops else '-'} | {r['memory_gb']:.1f} | {r['wall']:.0f} |",
                  flush=True)
    print(f"\ntotal {time.perf_counter() - started:.0f} s; last loss "
          + " / ".join(f"{r['loss']:.4f} ({key})" for key, r in results.items()))
    if "shards" in results and "memory" in results:
        print(f"shards / memory: {results['shards']['images_per_s'] / results['memory']['images_per_s']:.3f}")
    for name in ablations:
        r, base = results[f"ablation {name}"], "shards" if name in ALIGNED else "memory"
        print(f"--ablation {name} / baseline ({base}): images/s "
              f"{r['images_per_s'] / results[base]['images_per_s']:.3f}, "
              f"peak memory {r['memory_gb'] - results[base]['memory_gb']:+.1f} GB")
    if "shards" in results and "text" in results:
        print(f"stored text / text encoded per step: "
              f"{results['text']['images_per_s'] / results['shards']['images_per_s']:.2f}x")


if __name__ == "__main__":
    main()
