"""The vLLM generation engine, the production rollout path (``vllm`` is imported when an engine is built, so this
file imports where vLLM is absent); weights reload in place. Design: docs/design.md#the-vllm-engine."""
from __future__ import annotations

import gc
import inspect
import itertools
import logging
import os
import time
from typing import Any, Iterable, Optional, Sequence

import torch
from packaging.version import Version

from ..modules.base import VLMModule, split_visuals
from ..modules.loading import load_processor
from .engine import GenerationEngine, tensor_checksum
from .types import Completion, GenerationResult, Sample, SamplingConfig

logger = logging.getLogger(__name__)

# What SamplingParams(logprobs=0) returns: log_softmax(logits / T) of the sampled token (see above).
LOGPROBS_MODE = "processed_logprobs"
MIN_VLLM = (0, 16)  # the first vLLM whose workers reload weights in place from tensors (pyproject pins it)


def _worker_checksums(worker: Any, names: Optional[Sequence[str]]) -> dict[str, Optional[str]]:
    """Run inside a vLLM worker (``collective_rpc`` with a function): ``tensor_checksum`` of HF-named weights as
    vLLM holds them, mapped through the model's ``hf_to_vllm_mapper``; ``None`` for weights vLLM stores
    differently (q/k/v or gate/up fused, TP-sharded, repacked for a CPU kernel, cast). ``names=None``: every
    vLLM parameter under its vLLM name."""
    model = worker.model_runner.get_model()
    params = dict(model.named_parameters())
    if names is None:
        return {n: tensor_checksum(p) for n, p in params.items()}
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    out: dict[str, Optional[str]] = {}
    for name in names:
        vname = name
        if mapper is not None:
            mapped = mapper._map_name(name) if hasattr(mapper, "_map_name") else mapper.map_name(name)
            vname = mapped if mapped is not None else name
        p = params.get(vname)
        # numel 0: the weight lives in a kernel-specific packed buffer (vLLM on CPU).
        out[name] = tensor_checksum(p) if p is not None and p.numel() > 0 else None
    return out


def _takes_weights_iterator(worker: Any) -> bool:
    """Run inside a vLLM worker: does its ``reload_weights`` (or its model runner's, which the worker
    forwards ``**kwargs`` to) take tensors, the RL reload we use?"""
    fns = [worker.reload_weights, getattr(getattr(worker, "model_runner", None), "reload_weights", None)]
    return any(f is not None and "weights_iterator" in inspect.signature(f).parameters for f in fns)


class VLLMEngine(GenerationEngine):
    """Generate with vLLM's offline ``LLM``; load weights in place (see the module docstring)."""

    def __init__(self, model_path: str, module: VLMModule, *, dtype: str = "auto", tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.5, max_model_len: int = 1024, enforce_eager: bool = False,
                 seed: int = 0, limit_images_per_prompt: int = 4, processing_kwargs: Optional[dict[str, Any]] = None,
                 extra_engine_kwargs: Optional[dict[str, Any]] = None, per_request_seed: Optional[bool] = None) -> None:
        on_cpu = not torch.cuda.is_available()
        # A seed on each request makes vLLM sample those rows one by one (its slow path): on by default
        # on CPU only, where a retried chunk then gets the very same completions.
        self.per_request_seed = on_cpu if per_request_seed is None else per_request_seed
        env = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
        in_process = env == "0" if env is not None else on_cpu
        # vLLM reads these when the engine is built; they must be set before LLM(...).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
        if not in_process:
            # ``weights_checksum`` sends the workers a function, which vLLM's msgpack carries to an engine core in
            # another process only with pickle allowed (its sockets are local; the engine core inherits the variable).
            os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
            enforce_eager = True  # torch.compile on CPU needs a compiler and minutes; no gain here

        import vllm  # lazy: the main environment has no vLLM
        import vllm.envs as vllm_envs
        from vllm import LLM

        if Version(vllm.__version__).release < MIN_VLLM:  # before minutes of start-up, not at the first sync
            raise RuntimeError(f"vLLM {vllm.__version__} cannot reload weights from tensors (Worker.reload_weights("
                               f"weights_iterator=...) came in 0.16): pip install -U 'vllm>={'.'.join(map(str, MIN_VLLM))}'")

        # An engine built earlier in this process froze vLLM's view of the environment: thaw it for this one.
        if hasattr(vllm_envs, "disable_envs_cache"):
            vllm_envs.disable_envs_cache()

        self.module = module
        self.model_path = str(model_path)
        self.weights_version = 0
        self.processing_kwargs = dict(processing_kwargs or {})
        self.processor = load_processor(self.model_path, module, self.processing_kwargs)
        # Vision placeholders and delimiters are never sampled: a completion holding one cannot be scored.
        self.suppress_ids: list[int] = list(module.vision_token_ids(self.processor))

        dtype = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
        if dtype == "auto":  # as the transformers engine and the learner: vLLM's own "auto" is bf16
            dtype = "float32" if on_cpu else "bfloat16"
        kwargs: dict[str, Any] = dict(model=self.model_path, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                                      gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                                      enforce_eager=enforce_eager, seed=seed, logprobs_mode=LOGPROBS_MODE,
                                      limit_mm_per_prompt={"image": limit_images_per_prompt, "video": 1},
                                      **({"distributed_executor_backend": "mp"} if tensor_parallel_size > 1 else {}))
        # The processing options in the form vLLM hands to the HF processor, so that vLLM and the learner's processor
        # cut images into the same number of tokens (qwen's min_pixels / max_pixels: as they are).
        mm_kwargs = dict(self.processing_kwargs)
        if module.get_vlm_key() == "internvl" and "max_anyres_num" in mm_kwargs:
            n = int(mm_kwargs.pop("max_anyres_num"))
            mm_kwargs.update(max_patches=n, crop_to_patches=n > 1)
        if mm_kwargs:
            kwargs["mm_processor_kwargs"] = mm_kwargs
        kwargs.update(extra_engine_kwargs or {})
        t0 = time.perf_counter()
        self.llm = LLM(**kwargs)
        self.startup_s = time.perf_counter() - t0
        self.max_model_len = int(self.llm.llm_engine.vllm_config.model_config.max_model_len)  # what it accepts
        # Tensors passed to ``collective_rpc`` reach the model as the same objects only with the engine core and
        # its one worker in this process.
        engine, parallel = self.llm.llm_engine, self.llm.llm_engine.vllm_config.parallel_config
        self.in_process = (type(getattr(engine, "engine_core", None)).__name__ == "InprocClient"
                           and parallel.world_size == 1 and parallel.distributed_executor_backend in (None, "uni"))
        if not self.llm.collective_rpc(_takes_weights_iterator)[0]:  # else the first sync fails, minutes in
            raise RuntimeError(f"vLLM {vllm.__version__}: Worker.reload_weights takes no tensors (weights_iterator), "
                               "which vlgrpo's in-place weight sync needs: pip install -U vllm")
        logger.info("vLLM %s engine for %s ready in %.1fs (in_process=%s)", vllm.__version__,
                    self.model_path, self.startup_s, self.in_process)

    def sampling_params(self, sampling: SamplingConfig, seed: Optional[int] = None):
        from vllm import SamplingParams

        # logit_bias -inf: an exact ban. (vLLM's from_optional, used by its server, would clamp biases
        # to [-100, 100], not enough against a model that strongly prefers these tokens.)
        return SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                              top_k=sampling.top_k if sampling.top_k and sampling.top_k > 0 else 0,
                              max_tokens=sampling.max_tokens, seed=seed,
                              logprobs=0,  # only the sampled token's log-prob
                              logit_bias={i: float("-inf") for i in self.suppress_ids} or None)

    def generate(self, samples: Sequence[Sample], sampling: SamplingConfig,
                 prompt_inputs=None) -> list[GenerationResult]:  # unused: vLLM processes the prompts itself
        if not samples:
            return []
        texts = self.module.prepare_prompt(self.processor, [{"prompt": s.prompt} for s in samples])
        requests = [{"prompt": text, **({"multi_modal_data": _visuals(s.images)} if s.images else {})}
                    for text, s in zip(texts, samples)]
        if sampling.seed is None or not self.per_request_seed:
            params: Any = self.sampling_params(sampling)
        else:
            # vLLM seeds a request's n children with seed, seed+1, ...: requests n apart share no random stream.
            params = [self.sampling_params(sampling, sampling.seed + i * sampling.n) for i in range(len(samples))]
        outputs = self.llm.generate(requests, params, use_tqdm=False,
                                    tokenization_kwargs={"add_special_tokens": False})
        return [GenerationResult(text, [_completion(c) for c in sorted(out.outputs, key=lambda c: c.index)])
                for text, out in zip(texts, outputs)]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        """Reload in place from ``(hf_name, tensor)`` pairs (vLLM in this process only: see the module docstring)."""
        if not self.in_process:
            raise RuntimeError("this vLLM engine runs in worker processes: tensors cannot be passed to it; its "
                               "workers must receive weights through the weight-sync worker extension")
        t0 = time.perf_counter()
        count = itertools.count()  # advanced once per tensor vLLM consumed
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": (w for w, _ in zip(weights, count)),
                                                          "is_checkpoint_format": True})
        n = next(count)
        self.loaded(version)
        logger.info("vLLM engine: loaded %d tensors (version %d) in %.2fs", n, version, time.perf_counter() - t0)
        return n

    def loaded(self, version: int) -> None:
        """After new weights arrived (here or in the workers): forget everything computed with the
        old ones (KV prefix cache, encoder cache of vision embeddings, multimodal processor cache)."""
        llm = self.llm
        if llm.reset_prefix_cache() is False:
            logger.warning("vLLM refused to reset its prefix cache (requests still running)")
        llm.llm_engine.reset_encoder_cache()
        llm.reset_mm_cache()
        self.weights_version = int(version)

    def weights_checksum(self, names: Optional[Sequence[str]] = None) -> dict[str, Optional[str]]:
        """``tensor_checksum`` of HF-named weights inside vLLM's worker 0 (see ``_worker_checksums``)."""
        return self.llm.collective_rpc(_worker_checksums, args=(list(names) if names is not None else None,))[0]

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            try:
                core.shutdown()
            except Exception as e:  # noqa: BLE001 - best effort on teardown
                logger.debug("vLLM engine core shutdown: %s", e)
        del llm
        gc.collect()
        try:  # in-process engines leave vLLM's distributed state behind; clear it for the next one
            from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

            destroy_model_parallel()
            destroy_distributed_environment()
        except Exception as e:  # noqa: BLE001
            logger.debug("vLLM distributed teardown: %s", e)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _visuals(visuals: Sequence[Any]) -> dict[str, list]:
    """vLLM's ``multi_modal_data`` of one prompt: its images and its videos (each a list of frames)."""
    images, videos = split_visuals(visuals)
    kinds = {"image": images, "video": [(list(v), {**v.metadata(), "do_sample_frames": False}) for v in videos]}
    return {k: v for k, v in kinds.items() if v}


def _completion(out: Any) -> Completion:
    """A vLLM ``CompletionOutput``, with the log-prob of each sampled token from its per-position
    ``{token_id: Logprob}``."""
    if out.logprobs is None:
        raise RuntimeError("vLLM returned no log-probs although SamplingParams(logprobs=0) was set")
    ids = list(out.token_ids)
    logprobs = [float(getattr(entry[tok], "logprob", entry[tok])) for tok, entry in zip(ids, out.logprobs)]
    return Completion(ids, logprobs, out.text, "length" if out.finish_reason == "length" else "stop")
