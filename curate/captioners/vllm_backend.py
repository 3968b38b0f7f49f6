"""The ``vllm`` backend: in-process offline batch inference with vLLM (optional extra, CUDA only).

Deliberately thin, because CI cannot run it (no GPU): prompts are built exactly as in the
transformers backend (the model's own chat template through ``AutoProcessor``, the image as
``multi_modal_data``), per-request seeds come from the same :func:`request_seed`, and
everything else (prompts, QA, retries, writing) is the stage's shared, tested code. vLLM
schedules its own batches (continuous batching), so ``generate`` hands it every request at
once.

Under ``torchrun --nproc_per_node N`` (or ``srun --ntasks-per-node N``) each worker's engine
is pinned to its own GPU(s) by narrowing ``CUDA_VISIBLE_DEVICES`` to the LOCAL_RANK-th (or
SLURM_LOCALID-th) slice of ``tensor_parallel_size``
GPUs before vLLM starts its engine process (vLLM otherwise puts every worker on GPU 0).
vLLM may start that process with ``spawn``, so the calling script must guard its entry point
with ``if __name__ == "__main__"`` (``python -m curate`` does).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any

from curate.runner import local_rank as current_local_rank
from curate.runner import local_world_size

from .base import Captioner, CaptionerError, CaptionRequest, Generation

log = logging.getLogger(__name__)

__all__ = ["VLLMCaptioner", "vllm_available"]

NOT_INSTALLED = "vllm is not installed: pip install 'kiln[vllm]' (CUDA only)"


def vllm_available() -> bool:
    """vLLM is importable and a CUDA GPU is present (what ``--backend auto`` asks).

    Uses ``find_spec`` (importing vLLM takes seconds) and ``torch.cuda.device_count()``,
    which asks NVML and does not initialise CUDA in this process, unlike
    ``torch.cuda.is_available()``: vLLM may fork its engine process, and CUDA does not
    survive a fork.
    """
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.device_count() > 0


def _pin_local_gpus(tensor_parallel_size: int) -> None:
    """Give this torchrun or srun worker its own slice of the visible GPUs (see the module docstring)."""
    local_world = local_world_size()
    if local_world <= 1:
        return  # not under torchrun or srun, or one worker per node: vLLM's own choice is right
    local_rank = current_local_rank()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        devices = [d.strip() for d in visible.split(",") if d.strip()]
    else:
        import torch

        devices = [str(i) for i in range(torch.cuda.device_count())]
    mine = devices[local_rank * tensor_parallel_size : (local_rank + 1) * tensor_parallel_size]
    if len(mine) < tensor_parallel_size:
        raise CaptionerError(
            f"worker {local_rank} of {local_world} needs {tensor_parallel_size} GPU(s) but only "
            f"{len(devices)} are visible ({visible or 'all'}): launch fewer workers per node"
        )
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
    log.info("worker %d pinned to GPU(s) %s", local_rank, ",".join(mine))


class VLLMCaptioner(Captioner):
    """A vision-language model served in-process by ``vllm.LLM`` (offline batch inference).

    ``max_pixels`` / ``min_pixels`` go to the model's HF image processor inside vLLM
    (``mm_processor_kwargs``); one image per prompt (``limit_mm_per_prompt``), no video, so
    vLLM's memory profiling does not reserve room for inputs that never come.
    ``engine_kwargs`` reach ``vllm.LLM`` unchanged (``max_num_seqs``, ``enforce_eager``...).
    """

    backend = "vllm"

    def __init__(
        self,
        model: str,
        *,
        revision: str | None = None,
        max_pixels: int | None = None,
        min_pixels: int | None = None,
        tensor_parallel_size: int = 1,
        seed: int = 0,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        **engine_kwargs: Any,
    ) -> None:
        if importlib.util.find_spec("vllm") is None:
            raise CaptionerError(NOT_INSTALLED)
        _pin_local_gpus(tensor_parallel_size)  # before anything initialises CUDA
        try:
            import vllm
        except ImportError as e:  # installed but broken (a torch/CUDA mismatch, say)
            raise CaptionerError(f"{NOT_INSTALLED}; importing it failed: {e}") from e
        import torch

        if torch.cuda.device_count() == 0:
            raise CaptionerError("the vllm backend needs a CUDA GPU; use --backend transformers")
        from transformers import AutoProcessor

        from curate.models import resolved_commit

        self.model_id = str(model)
        self._SamplingParams = vllm.SamplingParams
        try:
            # The chat template, exactly as the transformers backend renders it.
            self.processor = AutoProcessor.from_pretrained(self.model_id, revision=revision)
        except Exception as e:
            raise CaptionerError(
                f"cannot load the processor of model {self.model_id!r}: {type(e).__name__}: {e}"
            ) from e
        mm_processor_kwargs = {
            name: value
            for name, value in (("max_pixels", max_pixels), ("min_pixels", min_pixels))
            if value is not None
        }
        options: dict[str, Any] = {
            "model": self.model_id,
            "revision": revision,
            "seed": seed,
            "tensor_parallel_size": tensor_parallel_size,
            "dtype": dtype,
            "gpu_memory_utilization": gpu_memory_utilization,
            "limit_mm_per_prompt": {"image": 1, "video": 0},
            **({"mm_processor_kwargs": mm_processor_kwargs} if mm_processor_kwargs else {}),
            **({"max_model_len": max_model_len} if max_model_len else {}),
            **engine_kwargs,
        }
        try:
            self.llm = vllm.LLM(**options)
        except Exception as e:
            raise CaptionerError(
                f"vllm cannot load model {self.model_id!r}: {type(e).__name__}: {e}"
            ) from e
        self.revision = resolved_commit(self.model_id, revision, None)

    def _prompt(self, request: CaptionRequest) -> dict[str, Any]:
        from .transformers_backend import chat_messages

        text = self.processor.apply_chat_template(
            chat_messages(request), tokenize=False, add_generation_prompt=True
        )
        return {"prompt": text, "multi_modal_data": {"image": request.image}}

    def _params(self, request: CaptionRequest) -> Any:
        from .base import request_seed

        s = request.sampling
        sampled = s.temperature > 0
        return self._SamplingParams(
            temperature=s.temperature,
            top_p=s.top_p if sampled else 1.0,
            max_tokens=s.max_new_tokens,
            repetition_penalty=s.repetition_penalty,
            # The same per-request seed as the transformers backend (not the same text: the
            # two samplers differ), so a rerun reproduces each request whatever its batch.
            seed=request_seed(s, request.key) if sampled else None,
            skip_special_tokens=True,
        )

    def generate(self, requests: list[CaptionRequest]) -> list[Generation]:
        """One generation per request, in order; vLLM batches them itself."""
        if not requests:
            return []
        try:
            return self._run(requests)
        except Exception as e:
            if _engine_lost(e):
                raise CaptionerError(f"the vLLM engine cannot go on ({type(e).__name__}: {e}); rerun the stage (the "
                                     "shard in progress is not committed)") from e
            if len(requests) == 1:
                log.warning("request %s failed: %s: %s", requests[0].key, type(e).__name__, e)
                return [Generation("", "error", error=f"{type(e).__name__}: {e}")]
            # One bad input (an image the processor refuses) fails the whole call: isolate it.
            log.warning("vllm failed on %d requests (%s: %s); retrying one by one",
                        len(requests), type(e).__name__, e)
            return [g for r in requests for g in self.generate([r])]

    def _run(self, requests: list[CaptionRequest]) -> list[Generation]:
        outputs = self.llm.generate(
            [self._prompt(r) for r in requests], [self._params(r) for r in requests],
            use_tqdm=False,
        )
        results = []
        for out in outputs:  # vLLM returns them in prompt order
            completion = out.outputs[0]
            tokens = len(completion.token_ids)
            if completion.finish_reason in ("stop", "length"):
                results.append(Generation(completion.text, completion.finish_reason, tokens=tokens))
            else:  # "abort" or unfinished
                results.append(Generation(completion.text, "error", tokens=tokens,
                                          error=f"vllm finish_reason {completion.finish_reason!r}"))
        return results

    def close(self) -> None:
        """Shut the engine down so its GPU memory is freed."""
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        engine = getattr(llm, "llm_engine", None)
        shutdown = getattr(engine, "shutdown", None) or getattr(
            getattr(engine, "engine_core", None), "shutdown", None
        )
        if callable(shutdown):
            try:
                shutdown()
            except Exception as e:  # freeing is best effort at exit
                log.debug("vllm shutdown failed: %s", e)
        del llm
        import gc

        gc.collect()


def _engine_lost(e: BaseException) -> bool:
    """An error after which no request can succeed: vLLM's engine process is gone (EngineDeadError),
    or the GPU failed (a CUDA error other than out-of-memory: an illegal memory access, a device-side
    assert). Retried request by request, every image left would be committed as a rejected caption,
    which a rerun does not redo."""
    import torch

    if isinstance(e, torch.cuda.OutOfMemoryError):
        return False
    return isinstance(e, torch.AcceleratorError) or type(e).__name__ == "EngineDeadError"
