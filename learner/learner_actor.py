"""The learner: one data-parallel rank of GRPO policy updates (plain class + Ray actor wrapper).

N ``Learner`` instances (usually Ray actors, ``LearnerActor``) form one data-parallel group:

* ``zero_stage`` 2 or 3: DeepSpeed ZeRO over ``torch.distributed`` (gloo on CPU with DeepSpeed's
  CPU accelerator, NCCL on GPU); 0: plain torch, gradients all-reduced by hand (also gloo/NCCL).
* Every rank receives its own shard of the step's batch (``TrainBatch.split``); the loss is
  normalised with the counts of the *global* batch and scaled by ``world_size``, so the averaged
  gradient equals the full-batch gradient whatever the sharding and micro-batching
  (see ``vlgrpo.learner.grpo``).
* Ranks run the same number of forward/backward passes (ZeRO's collectives need it): a rank with
  fewer micro-batches than the others runs its first one again with weight 0.

Collective methods -- call them on *every* rank at the same time (for Ray: ``.remote()`` on every
actor, then ``ray.get``): ``train_step``, ``named_weights`` (fully iterate it everywhere),
``get_weights``, ``save_checkpoint``, ``load_checkpoint``, ``save_pretrained``.
"""
from __future__ import annotations

import math
import os
import random
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from vlgrpo.modules.loading import checkpoint_name_map  # noqa: F401 (re-exported)

from .grpo import grpo_loss, truncated_importance_weights
from .logprobs import build_rows_inputs, per_token_logprobs
from .types import LearnerConfig, TrainBatch

_CKPT_FILE = "learner_state.pt"


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def lr_lambda_factory(cfg: LearnerConfig):
    """``step -> lr factor``: linear warmup over ``warmup_steps`` optimiser steps (the first step
    uses ``1 / warmup_steps``), then constant, linear or cosine decay to ``min_lr_ratio`` at
    ``total_steps``."""
    warm = max(0, int(cfg.warmup_steps))
    total = max(int(cfg.total_steps), warm + 1)
    floor = float(cfg.min_lr_ratio)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        if cfg.lr_schedule == "linear":
            return floor + (1.0 - floor) * (1.0 - progress)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def _set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def _last_valid_len(mask: torch.Tensor) -> int:
    """1 + index of the last 1 in any row (at least 1)."""
    cols = mask.any(dim=0).nonzero()
    return int(cols.max()) + 1 if cols.numel() else 1


# ------------------------------------------------------------------------------------------------
# the learner
# ------------------------------------------------------------------------------------------------
class Learner:
    """One data-parallel rank. See the module docstring for which methods are collective."""

    def __init__(
        self,
        cfg: LearnerConfig | dict,
        rank: int = 0,
        world_size: int = 1,
        master_addr: str = "127.0.0.1",
        master_port: int = 29500,
    ) -> None:
        t0 = time.perf_counter()
        self.cfg = cfg if isinstance(cfg, LearnerConfig) else LearnerConfig.from_dict(dict(cfg))
        cfg = self.cfg
        if not cfg.model_path:
            raise ValueError("LearnerConfig.model_path is empty")
        self.rank, self.world_size = int(rank), int(world_size)
        self.on_gpu = torch.cuda.is_available()
        # Ray restricts CUDA_VISIBLE_DEVICES to the actor's GPU(s): the first visible is ours.
        self.device = torch.device("cuda", 0) if self.on_gpu else torch.device("cpu")
        if self.on_gpu:
            torch.cuda.set_device(self.device)
        self.dtype = cfg.torch_dtype(self.on_gpu)
        n_threads = cfg.num_threads or max(1, (os.cpu_count() or 1) // self.world_size)
        torch.set_num_threads(int(n_threads))
        self.use_deepspeed = cfg.zero_stage > 0
        self._init_distributed(master_addr, master_port)
        _set_seed(cfg.seed)

        from vlgrpo.modules import resolve_module
        from vlgrpo.modules.loading import load_model_and_processor

        # Build/load the model *before* DeepSpeed (never inside zero.Init).
        self.module = resolve_module(cfg.model_path, cfg.module)
        model, self.processor = load_model_and_processor(
            cfg.model_path, self.module, dtype=self.dtype,
            processing_kwargs=cfg.processing_kwargs or None,
            model_init_kwargs=cfg.model_init_kwargs or None,
        )
        if getattr(model, "config", None) is not None:
            model.config.use_cache = False
        # the rollout engines never sample the vision placeholders: score under the same policy
        self.suppress_ids = self.module.vision_token_ids(self.processor)
        self._name_map = checkpoint_name_map(model)
        self._frozen: list[str] = []
        if cfg.freeze_vision:
            keys = self.module.get_vision_modules_keywords()
            for name, p in model.named_parameters():
                if any(k in name for k in keys):
                    p.requires_grad_(False)
                    self._frozen.append(name)
            if not self._frozen:
                warnings.warn(f"freeze_vision: no parameter name contains any of {keys}")
        if cfg.gradient_checkpointing:
            ckpt_kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt_kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
        model.to(self.device)
        model.train()

        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        decay = [p for n, p in trainable if p.dim() >= 2]
        no_decay = [p for n, p in trainable if p.dim() < 2]  # biases and norm weights
        groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        if cfg.offload_optimizer and self.use_deepspeed:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps,
                                         adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps,
                                          foreach=False if not self.on_gpu else None)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_factory(cfg))

        if self.use_deepspeed:
            import deepspeed

            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self._ds_config())
            self.model = self.engine.module
        else:
            self.engine = None
            self.model, self.optimizer, self.scheduler = model, optimizer, scheduler

        self.ref_model = None
        self.ref_module = None
        if cfg.beta > 0:
            from .reference import load_reference_model, wrap_reference_zero3

            self.ref_model, self.ref_module = load_reference_model(cfg, self.device, self.dtype)
            if cfg.zero_stage == 3:
                self.ref_model = wrap_reference_zero3(self.ref_model, cfg.micro_batch_size,
                                                      self.world_size, self.dtype)
        self.global_step = 0  # optimiser steps taken
        self.init_time_s = time.perf_counter() - t0

    # -- setup ------------------------------------------------------------------------------------
    def _init_distributed(self, master_addr: str, master_port: int) -> None:
        backend = "nccl" if self.on_gpu else "gloo"
        if self.use_deepspeed or self.world_size > 1:
            os.environ["MASTER_ADDR"] = str(master_addr)
            os.environ["MASTER_PORT"] = str(master_port)
            os.environ["RANK"] = str(self.rank)
            os.environ["WORLD_SIZE"] = str(self.world_size)
            os.environ["LOCAL_RANK"] = "0" if self.on_gpu else str(self.rank)
            os.environ["LOCAL_WORLD_SIZE"] = os.environ.get("LOCAL_WORLD_SIZE", str(self.world_size))
        if self.use_deepspeed:
            import deepspeed

            deepspeed.init_distributed(dist_backend=backend)
        elif self.world_size > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}",
                                        rank=self.rank, world_size=self.world_size)

    def _ds_config(self) -> dict[str, Any]:
        cfg = self.cfg
        zero: dict[str, Any] = {
            "stage": cfg.zero_stage,
            "contiguous_gradients": True,
            "overlap_comm": self.on_gpu,
            "reduce_bucket_size": 5e7,
        }
        if cfg.zero_stage == 3:
            zero.update({"stage3_param_persistence_threshold": 10_000,
                         "stage3_max_live_parameters": 1e9, "stage3_prefetch_bucket_size": 5e7})
        if cfg.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": self.on_gpu}
        ds: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
            "gradient_accumulation_steps": 1,  # the boundary is set by hand per step
            "train_batch_size": cfg.micro_batch_size * self.world_size,
            "gradient_clipping": float(cfg.grad_clip) if cfg.grad_clip and cfg.grad_clip > 0 else 0.0,
            "zero_optimization": zero,
            "bf16": {"enabled": self.dtype == torch.bfloat16},
            "fp16": {"enabled": self.dtype == torch.float16},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        if self.dtype in (torch.bfloat16, torch.float16):
            ds["data_types"] = {"grad_accum_dtype": "fp32"}
        return ds

    # -- small collectives ------------------------------------------------------------------------
    def _dist(self) -> bool:
        import torch.distributed as dist

        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def _all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if not self._dist():
            return t
        import torch.distributed as dist

        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dev = t.to(self.device)
        dist.all_reduce(dev, op=ops[op])
        return dev.to(t.device)

    def _barrier(self) -> None:
        if self._dist():
            import torch.distributed as dist

            dist.barrier()

    # -- info -------------------------------------------------------------------------------------
    def ping(self) -> dict[str, Any]:
        return {"rank": self.rank, "world_size": self.world_size, "device": str(self.device),
                "dtype": str(self.dtype).replace("torch.", ""), "zero_stage": self.cfg.zero_stage,
                "pid": os.getpid(), "threads": torch.get_num_threads(),
                "global_step": self.global_step, "init_time_s": round(self.init_time_s, 3)}

    def _ck(self, name: str) -> str:
        return self._name_map.get(name, name) if self._name_map else name

    def trainable_names(self) -> list[str]:
        """Checkpoint (HF state_dict) names of the parameters the optimizer updates."""
        return [self._ck(n) for n, p in self.model.named_parameters() if p.requires_grad]

    def frozen_names(self) -> list[str]:
        """Checkpoint names of frozen parameters (e.g. the vision tower with ``freeze_vision``)."""
        return [self._ck(n) for n, p in self.model.named_parameters() if not p.requires_grad]

    def get_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # -- forward helpers --------------------------------------------------------------------------
    def _forward_model(self):
        return self.engine if self.engine is not None else self.model

    def _micro_batches(self, batch: TrainBatch) -> list[dict[str, Any]]:
        mbs = self.cfg.micro_batch_size
        pidx = batch.row_prompt_index()
        mask = batch.completion_mask.bool()
        out = []
        for s in range(0, batch.num_rows, mbs):
            e = min(s + mbs, batch.num_rows)
            t = _last_valid_len(mask[s:e])  # trim trailing all-padding columns
            inputs = build_rows_inputs(self.module, self.processor, batch.prompts_text,
                                       batch.images, pidx[s:e])
            inputs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v
                      for k, v in inputs.items()}
            if self.dtype != torch.float32:
                inputs = {k: v.to(self.dtype) if isinstance(v, torch.Tensor) and v.is_floating_point()
                          else v for k, v in inputs.items()}

            def cut(x, s=s, e=e, t=t):
                return None if x is None else x[s:e, :t].to(self.device)

            out.append({
                "inputs": inputs,
                "ids": cut(batch.completion_ids),
                "mask": cut(batch.completion_mask).bool(),
                "adv": batch.advantages[s:e].to(self.device, torch.float32),
                "old": None if batch.old_logprobs is None else cut(batch.old_logprobs).float(),
                "ref": None if batch.ref_logprobs is None else cut(batch.ref_logprobs).float(),
                "samp": None if batch.sampling_logprobs is None else cut(batch.sampling_logprobs).float(),
            })
        return out

    def _logprobs(self, model, module, mb, entropy: bool = False):
        return per_token_logprobs(model, module, mb["inputs"], mb["ids"], mb["mask"],
                                  temperature=self.cfg.temperature, return_entropy=entropy,
                                  suppress_ids=self.suppress_ids)

    # -- training ---------------------------------------------------------------------------------
    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """``num_iterations`` optimiser steps on this rank's shard ``batch`` (collective).

        Returns the step's metrics, reduced over all ranks (identical on every rank):
        ``loss`` = ``pg_loss`` + ``kl_loss`` (mean over the μ iterations), token means over the
        global batch ``ratio_mean`` / ``clip_frac_low`` / ``clip_frac_high`` / ``clip_frac`` /
        ``entropy`` / ``kl`` (k3 to the reference, when there is one), ``ratio_min`` /
        ``ratio_max``, ``grad_norm`` (before clipping, last iteration) and ``grad_norm_mean``,
        ``lr`` (used by the last optimiser step), ``num_seqs`` / ``num_tokens`` (global),
        ``num_micro_batches`` (per rank, max), ``global_step``, ``time_s`` and its parts
        ``time_prepare_s`` (processor) / ``time_ref_old_s`` (no-grad pass) / ``time_update_s``,
        ``tokens_per_s`` (completion tokens x μ / time_s, whole group) and, when the batch has
        ``sampling_logprobs``, ``sampler_logprob_abs_diff`` (mean |learner - sampler| log-prob
        before the update: 0 up to numerics when the sampler had the same weights)."""
        cfg = self.cfg
        t_start = time.perf_counter()
        if batch.num_rows == 0:
            raise ValueError("a learner rank received an empty batch shard")
        mask = batch.completion_mask.bool()
        # global counts: [rows, valid tokens] summed, [micro-batches, T] maxed
        sums = self._all_reduce(torch.tensor([float(batch.num_rows), float(mask.sum())],
                                             dtype=torch.float64))
        n_local_micro = math.ceil(batch.num_rows / cfg.micro_batch_size)
        maxes = self._all_reduce(torch.tensor([float(n_local_micro), float(mask.shape[1])],
                                              dtype=torch.float64), op="max")
        g_seqs = float(batch.global_num_seqs) if batch.global_num_seqs is not None else float(sums[0])
        g_toks = float(batch.global_num_tokens) if batch.global_num_tokens is not None else float(sums[1])
        n_micro = int(maxes[0])
        max_len_norm = cfg.max_completion_length or int(maxes[1])

        micros = self._micro_batches(batch)
        t_prep = time.perf_counter()
        model = self._forward_model()

        def schedule():
            for j in range(n_micro):
                yield j, (micros[j] if j < len(micros) else micros[0]), j < len(micros)

        # ---- pass without grad: old log-probs (μ > 1) and reference log-probs (beta > 0)
        need_old = cfg.num_iterations > 1 and batch.old_logprobs is None
        need_ref = cfg.beta > 0 and batch.ref_logprobs is None
        diff_sum = torch.zeros((), dtype=torch.float64)
        diff_done = False
        if need_old or need_ref:
            with torch.no_grad():
                for _, mb, real in schedule():
                    if need_old:
                        old = self._logprobs(model, self.module, mb)
                        if real:
                            mb["old"] = old.float()
                    if need_ref:
                        ref = self._logprobs(self.ref_model, self.ref_module, mb)
                        if real:
                            mb["ref"] = ref.float()
        t_ref = time.perf_counter()

        # ---- optimiser steps
        acc: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), dtype=torch.float64))
        ratio_min, ratio_max = math.inf, -math.inf
        grad_norms, lrs = [], []
        nonfinite_micro = 0
        for it in range(cfg.num_iterations):
            lrs.append(self.get_lr())  # the lr this optimiser step uses
            for j, mb, real in schedule():
                if self.engine is not None:
                    self.engine.set_gradient_accumulation_boundary(j == n_micro - 1)
                want_ent = cfg.compute_entropy and real
                res = self._logprobs(model, self.module, mb, entropy=want_ent)
                logp, ent = res if want_ent else (res, None)
                old = mb["old"]
                iw = None
                if cfg.tis_cap and mb["samp"] is not None:
                    base = old if old is not None else logp.detach()
                    iw = truncated_importance_weights(base, mb["samp"], cfg.tis_cap)
                if real and it == 0 and mb["samp"] is not None:
                    # the current policy (before this step's update) vs the sampler's log-probs:
                    # ~0 when the rollout engine holds the learner's weights
                    diff_sum += ((logp.detach() - mb["samp"]).abs() * mb["mask"]).sum().double().cpu()
                    diff_done = True
                loss, m = grpo_loss(
                    logp, old, mb["adv"], mb["mask"], ref_logprobs=mb["ref"], beta=cfg.beta,
                    epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high,
                    loss_agg=cfg.loss_agg, max_len_norm=max_len_norm, global_num_seqs=g_seqs,
                    global_num_tokens=g_toks, importance_weights=iw, loss_scale=self.world_size,
                )
                if not real:
                    loss = loss * 0.0
                # A non-finite loss on any rank: this micro-batch contributes no gradient on
                # every rank (ranks must keep running the same collectives), and it is counted.
                bad = self._all_reduce(torch.tensor(0.0 if bool(torch.isfinite(loss)) else 1.0,
                                                    dtype=torch.float64), op="max")
                if float(bad) > 0:
                    nonfinite_micro += 1
                    loss = logp.nan_to_num(0.0, 0.0, 0.0).sum() * 0.0
                    real = False
                if self.engine is not None:
                    self.engine.backward(loss, scale_wrt_gas=False)
                    self.engine.step()  # applies the update only at the boundary
                else:
                    loss.backward()
                if real:
                    ntok = m["num_tokens"].double().cpu()
                    acc["pg_loss"] += m["pg_loss"].double().cpu()
                    acc["kl_loss"] += m["kl_loss"].double().cpu()
                    for k in ("ratio_mean", "clip_frac_low", "clip_frac_high", "clip_frac", "kl_mean"):
                        if k in m:
                            acc[k] += m[k].double().cpu() * ntok
                    if ent is not None:
                        acc["entropy"] += (ent * mb["mask"]).sum().double().cpu()
                    acc["tokens"] += ntok
                    if ntok > 0:
                        ratio_min = min(ratio_min, float(m["ratio_min"]))
                        ratio_max = max(ratio_max, float(m["ratio_max"]))
            if self.engine is not None:
                gn = self.engine.get_global_grad_norm()
                grad_norms.append(float(gn) if gn is not None else float("nan"))
            elif nonfinite_micro and nonfinite_micro == n_micro * (it + 1):
                # every micro-batch was non-finite: skip the optimiser step entirely
                self.optimizer.zero_grad(set_to_none=True)
                grad_norms.append(float("nan"))
            else:
                grad_norms.append(self._plain_step())
            self.global_step += 1
        t_end = time.perf_counter()

        keys = ["pg_loss", "kl_loss", "ratio_mean", "clip_frac_low", "clip_frac_high", "clip_frac",
                "kl_mean", "entropy", "tokens"]
        vec = torch.stack([acc[k] for k in keys] + [diff_sum])
        vec = self._all_reduce(vec)
        tot = dict(zip(keys + ["sampler_diff"], vec.tolist()))
        extremes = self._all_reduce(torch.tensor([-ratio_min, ratio_max], dtype=torch.float64), op="max")
        mu = cfg.num_iterations
        ntok_all = max(tot["tokens"], 1.0)
        metrics = {
            "loss": (tot["pg_loss"] + tot["kl_loss"]) / mu,
            "pg_loss": tot["pg_loss"] / mu,
            "kl_loss": tot["kl_loss"] / mu,
            "ratio_mean": tot["ratio_mean"] / ntok_all,
            "ratio_min": -float(extremes[0]),
            "ratio_max": float(extremes[1]),
            "clip_frac_low": tot["clip_frac_low"] / ntok_all,
            "clip_frac_high": tot["clip_frac_high"] / ntok_all,
            "clip_frac": tot["clip_frac"] / ntok_all,
            "grad_norm": grad_norms[-1],
            "grad_norm_mean": sum(grad_norms) / len(grad_norms),
            "lr": lrs[-1],
            "num_seqs": g_seqs,
            "num_tokens": g_toks,
            "num_micro_batches": float(n_micro),
            "num_iterations": float(mu),
            "global_step": float(self.global_step),
            "time_s": t_end - t_start,
            "time_prepare_s": t_prep - t_start,
            "time_ref_old_s": t_ref - t_prep,
            "time_update_s": t_end - t_ref,
            "tokens_per_s": g_toks * mu / max(t_end - t_start, 1e-9),
            "nonfinite_micro_batches": float(nonfinite_micro),
        }
        if cfg.beta > 0 or batch.ref_logprobs is not None:
            metrics["kl"] = tot["kl_mean"] / ntok_all
        if cfg.compute_entropy:
            metrics["entropy"] = tot["entropy"] / ntok_all
        if diff_done or batch.sampling_logprobs is not None:
            metrics["sampler_logprob_abs_diff"] = tot["sampler_diff"] / max(g_toks, 1.0)
        return metrics

    def _plain_step(self) -> float:
        """zero_stage 0: average gradients over ranks, clip, step. Returns the grad norm."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self._dist():
            import torch.distributed as dist

            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= self.world_size
            off = 0
            for p, g in zip(params, grads):
                k = g.numel()
                p.grad = flat[off:off + k].view_as(p).clone()
                off += k
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip and self.cfg.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @torch.no_grad()
    def compute_logprobs(self, batch: TrainBatch, reference: bool = False) -> torch.Tensor:
        """Log-probs ``[N, T]`` of this rank's rows under the current policy (or the reference
        model). Collective under ZeRO-3 (all ranks must call it with the same number of
        micro-batches; pass equal-sized shards)."""
        model = self.ref_model if reference else self._forward_model()
        module = self.ref_module if reference else self.module
        if model is None:
            raise ValueError("no reference model (beta == 0)")
        out = torch.zeros(batch.completion_ids.shape, dtype=torch.float32)
        s = 0
        for mb in self._micro_batches(batch):
            lp = self._logprobs(model, module, mb).float().cpu()
            n, t = lp.shape
            out[s:s + n, :t] = lp
            s += n
        return out

    # -- weights ----------------------------------------------------------------------------------
    def _export_items(self) -> list[tuple[str, torch.Tensor]]:
        model = self.model
        params = dict(model.named_parameters(remove_duplicate=False))
        names = list(self._name_map) if self._name_map else list(params)
        out = []
        for n in names:
            t = params.get(n)
            if t is None:
                t = model.get_buffer(n)
            out.append((n, t))
        return out

    def named_weights(self, bucket_numel: int = 50_000_000, device: Optional[str] = None,
                      all_ranks: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """Full weights as ``(checkpoint name, tensor)``, names as in the HF ``state_dict`` of the
        saved checkpoint (what vLLM's ``load_weights`` / ``reload_weights`` expect).

        Collective: iterate it to the end on *every* rank (ZeRO-3 gathers ``bucket_numel``
        elements at a time on all ranks). Only rank 0 yields unless ``all_ranks``. Under ZeRO-3
        each tensor is a fresh copy of one gathered parameter (never the whole model at once);
        otherwise it is the live parameter (detached, no copy): copy it if you keep it past the
        next ``train_step``. ``device``: move tensors there (e.g. ``"cpu"``)."""
        emit = all_ranks or self.rank == 0
        if self._name_map is None:  # conversions that merge/split tensors: whole state dict
            yield from self._named_weights_converted(emit, device)
            return
        items = self._export_items()
        zero3 = self.cfg.zero_stage == 3

        def finish(t: torch.Tensor, copy: bool) -> torch.Tensor:
            t = t.detach()
            if device is not None:
                t = t.to(device)
            return t.clone() if copy else t

        if not zero3:
            if emit:
                for n, t in items:
                    yield self._ck(n), finish(t, copy=False)
            return
        import deepspeed

        bucket: list[tuple[str, torch.Tensor]] = []
        size = 0

        def flush(bucket):
            params = [t for _, t in bucket if hasattr(t, "ds_id")]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                got = [(self._ck(n), finish(t, copy=True)) if emit else None for n, t in bucket]
            return got

        for n, t in items:
            bucket.append((n, t))
            size += int(getattr(t, "ds_numel", t.numel()))
            if size >= bucket_numel:
                got, bucket, size = flush(bucket), [], 0
                if emit:
                    yield from got
        if bucket:
            got = flush(bucket)
            if emit:
                yield from got

    def _named_weights_converted(self, emit: bool, device: Optional[str]):
        sd = self._gather_state_dict(emit)
        if not emit:
            return
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        sd = revert_weight_conversion(self.model, remove_tied_weights_from_state_dict(sd, self.model))
        for k, v in sd.items():
            yield k, (v.to(device) if device is not None else v)

    def _gather_state_dict(self, emit: bool) -> dict[str, torch.Tensor]:
        """In-memory names -> CPU copies (collective under ZeRO-3); empty where not ``emit``."""
        model = self.model
        sd: dict[str, torch.Tensor] = {}
        params = dict(model.named_parameters(remove_duplicate=False))
        names = list(model.state_dict().keys())
        if self.cfg.zero_stage == 3:
            import deepspeed

            for n in names:
                t = params.get(n)
                ps = [t] if t is not None and hasattr(t, "ds_id") else []
                with deepspeed.zero.GatheredParameters(ps, modifier_rank=None):
                    if emit:
                        src = t if t is not None else model.get_buffer(n)
                        sd[n] = src.detach().to("cpu", copy=True)
        elif emit:
            full = model.state_dict()
            sd = {n: full[n].detach().to("cpu", copy=True) for n in names}
        return sd

    def weights_meta(self) -> list[tuple[str, tuple[int, ...], str]]:
        """``(checkpoint name, full shape, dtype)`` of every tensor ``named_weights`` yields, in
        the same order; not collective (e.g. to allocate receive buffers for a broadcast)."""
        if self._name_map is None:
            raise NotImplementedError("weights_meta needs pure-renaming checkpoint conversions")
        return [(self._ck(n), tuple(getattr(t, "ds_shape", t.shape)), str(t.dtype).replace("torch.", ""))
                for n, t in self._export_items()]

    def get_weights(self, names: Optional[Sequence[str]] = None) -> Optional[dict[str, torch.Tensor]]:
        """Collective: ``{checkpoint name: CPU tensor}`` on rank 0 (None elsewhere). Holds a full
        copy: for tests and small models; use ``named_weights`` to stream."""
        wanted = set(names) if names is not None else None
        out = {}
        for k, v in self.named_weights(device="cpu"):
            if wanted is None or k in wanted:
                out[k] = v.clone()
        return out if self.rank == 0 else None

    # -- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self, ckpt_dir: str, tag: Optional[str] = None) -> str:
        """Collective: everything needed to resume exactly (weights, optimizer, scheduler,
        step, RNG). DeepSpeed stages write DeepSpeed's own sharded format under
        ``ckpt_dir/tag``; stage 0 writes ``ckpt_dir/learner_state.pt`` from rank 0."""
        path = Path(ckpt_dir)
        path.mkdir(parents=True, exist_ok=True)
        client = {"global_step": self.global_step, "torch_rng": torch.get_rng_state(),
                  "python_rng": random.getstate()}
        if self.engine is not None:
            self.engine.save_checkpoint(str(path), tag=tag or f"step{self.global_step}",
                                        client_state=client)
        else:
            if self.rank == 0:
                torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                            "scheduler": self.scheduler.state_dict(), **client}, path / _CKPT_FILE)
            self._barrier()
        return str(path)

    def load_checkpoint(self, ckpt_dir: str, tag: Optional[str] = None) -> int:
        """Collective: restore a ``save_checkpoint`` directory. Returns the restored step."""
        path = Path(ckpt_dir)
        if self.engine is not None:
            load_path, client = self.engine.load_checkpoint(
                str(path), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
            if load_path is None:
                raise FileNotFoundError(f"no DeepSpeed checkpoint under {path}")
        else:
            client = torch.load(path / _CKPT_FILE, map_location=self.device, weights_only=True)  # no unpickling of arbitrary objects
            self.model.load_state_dict(client["model"])
            self.optimizer.load_state_dict(client["optimizer"])
            self.scheduler.load_state_dict(client["scheduler"])
        self.global_step = int(client.get("global_step", 0))
        if "torch_rng" in client:
            torch.set_rng_state(client["torch_rng"].cpu())
        if "python_rng" in client:
            random.setstate(client["python_rng"])
        return self.global_step

    def save_pretrained(self, out_dir: str) -> Optional[str]:
        """Collective: write the current policy in Hugging Face format (model + processor) from
        rank 0, loadable by ``from_pretrained`` and vLLM. Holds one full CPU copy on rank 0."""
        sd = self._gather_state_dict(self.rank == 0)
        if self.rank == 0:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            self.model.save_pretrained(out_dir, state_dict=sd)
            self.processor.save_pretrained(out_dir)
        self._barrier()
        return out_dir if self.rank == 0 else None


# ------------------------------------------------------------------------------------------------
# Ray
# ------------------------------------------------------------------------------------------------
def _ray():
    import ray

    return ray


class _LazyActor:
    """``LearnerActor.options(...).remote(...)`` / ``LearnerActor.remote(...)``: ``ray.remote(Learner)``
    created on first use (importing this module does not import Ray)."""

    _cls = None

    def _get(self):
        if _LazyActor._cls is None:
            _LazyActor._cls = _ray().remote(Learner)
        return _LazyActor._cls

    def remote(self, *args, **kwargs):
        return self._get().remote(*args, **kwargs)

    def options(self, **kwargs):
        return self._get().options(**kwargs)


LearnerActor = _LazyActor()


def create_learner_group(
    cfg: LearnerConfig,
    world_size: int,
    num_cpus_per_actor: float = 1,
    num_gpus_per_actor: float = 0,
    scheduling_strategies: Optional[Sequence[Any]] = None,
    runtime_env: Optional[dict] = None,
    actor_class: Any = None,
) -> list:
    """Start ``world_size`` learner actors forming one data-parallel group; returns their handles
    (rank order) once every rank is initialised. ``scheduling_strategies[r]`` (e.g. a
    ``PlacementGroupSchedulingStrategy`` per bundle) places rank ``r``; the rendezvous address is
    taken on rank 0's node. ``actor_class``: a ``ray.remote`` subclass of ``Learner`` (default
    ``LearnerActor``)."""
    ray = _ray()
    strategies = list(scheduling_strategies) if scheduling_strategies else [None] * world_size
    from ..cluster.weight_sync import node_ip_and_port

    probe = ray.remote(num_cpus=0)(node_ip_and_port)
    if strategies[0] is not None:
        probe = probe.options(scheduling_strategy=strategies[0])
    addr, port = ray.get(probe.remote())
    actors = []
    for r in range(world_size):
        opts: dict[str, Any] = {"num_cpus": num_cpus_per_actor, "num_gpus": num_gpus_per_actor}
        if strategies[r] is not None:
            opts["scheduling_strategy"] = strategies[r]
        if runtime_env:
            opts["runtime_env"] = runtime_env
        actors.append((actor_class or LearnerActor).options(**opts).remote(cfg, r, world_size, addr, port))
    ray.get([a.ping.remote() for a in actors])
    return actors


def group_call(actors: Sequence[Any], method: str, *args, **kwargs) -> list:
    """Call ``method`` on every actor at once (for collective methods) and wait for all."""
    ray = _ray()
    return ray.get([getattr(a, method).remote(*args, **kwargs) for a in actors])


def group_train_step(actors: Sequence[Any], batch: TrainBatch) -> dict[str, float]:
    """Split ``batch`` over the group, run one ``train_step`` on every rank, return rank 0's metrics."""
    ray = _ray()
    shards = batch.split(len(actors))
    return ray.get([a.train_step.remote(s) for a, s in zip(actors, shards)])[0]
