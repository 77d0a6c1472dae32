"""One data-parallel learner rank: GRPO policy updates under DeepSpeed ZeRO 2/3 (or plain torch, 0,
gradients all-reduced by hand), over gloo on CPU and NCCL on GPU. N ``Learner`` Ray actors form one
group; each trains on its shard of the step's batch (``TrainBatch.split``) with the loss normalised by
the *global* counts and scaled by ``world_size``, so the averaged gradient is the full-batch gradient
(``learner.grpo``). Ranks run the same number of forward/backward passes (ZeRO's collectives need it):
one with fewer micro-batches runs its first again with weight 0. ``train_step`` and the weight and
checkpoint methods (``weights.LearnerWeights``) are collective: call them on every rank at once.
"""
from __future__ import annotations

import math
import os
import random
import time
import warnings
from collections import defaultdict
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from ..modules import resolve_module
from ..modules.loading import ModelConfig, checkpoint_name_map, load_model_and_processor
from .grpo import grpo_loss, truncated_importance_weights
from .logprobs import build_micro_inputs, micro_cuts, per_token_logprobs
from .lora import apply_lora
from .reference import AdapterDisabled, load_reference_model, wrap_reference_zero3
from .types import LearnerConfig, MicroBatch, TrainBatch
from .weights import LearnerWeights


def lr_lambda_factory(cfg: LearnerConfig):
    """``optimiser step -> lr factor``: linear warmup over ``warmup_steps`` (the first step uses
    ``1 / warmup_steps``), then constant, linear or cosine decay to ``min_lr_ratio`` at
    ``total_steps``."""
    warm, floor = max(0, int(cfg.warmup_steps)), float(cfg.min_lr_ratio)
    total = max(int(cfg.total_steps), warm + 1)

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


class Learner(LearnerWeights):
    def __init__(self, cfg: LearnerConfig, model_cfg: ModelConfig, rank: int = 0, world_size: int = 1,
                 master_addr: str = "127.0.0.1", master_port: int = 29500) -> None:
        t0 = time.perf_counter()
        if not model_cfg.path:
            raise ValueError("model.path is empty: the run config resolves it before learners start")
        self.cfg, self.rank, self.world_size = cfg, int(rank), int(world_size)
        self.on_gpu = torch.cuda.is_available()
        # Ray restricts CUDA_VISIBLE_DEVICES to the actor's GPU(s): the first visible is ours.
        self.device = torch.device("cuda", 0) if self.on_gpu else torch.device("cpu")
        if self.on_gpu:
            torch.cuda.set_device(self.device)
        self.dtype = cfg.torch_dtype(self.on_gpu)
        torch.set_num_threads(int(cfg.num_threads or max(1, int(cfg.cpus_per_rank))))  # Ray's allocation
        self._init_distributed(master_addr, master_port)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)

        # Build/load the model *before* DeepSpeed (never inside zero.Init).
        self.module = resolve_module(model_cfg.path, model_cfg.module)
        model, self.processor = load_model_and_processor(model_cfg.path, self.module, self.dtype,
                                                         model_cfg.processing_kwargs, model_cfg.init_kwargs)
        model.config.use_cache = False
        # the rollout engines never sample the vision placeholders: score under the same policy
        self.suppress_ids = self.module.vision_token_ids(self.processor)
        self._name_map = checkpoint_name_map(model)
        if cfg.freeze_vision:
            keys = self.module.get_vision_modules_keywords()
            frozen = [p.requires_grad_(False) for n, p in model.named_parameters() if any(k in n for k in keys)]
            if not frozen:
                warnings.warn(f"learner.freeze_vision: no parameter name contains any of {keys}")
        model, self._name_map, self.peft_model = apply_lora(model, cfg.lora, self.module, self._name_map)
        if cfg.gradient_checkpointing:  # transformers >= 5 renamed it
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.to(self.device).train()
        self.model, self.engine, self.optimizer, self.scheduler = self._optimizer(model)

        self.ref_model = self.ref_module = None
        if cfg.beta > 0 and self.peft_model is not None:  # LoRA: the base model is the policy, adapter off
            self.ref_model, self.ref_module = AdapterDisabled(self.peft_model), self.module
        elif cfg.beta > 0:
            self.ref_model, self.ref_module = load_reference_model(model_cfg, self.device, self.dtype)
            if cfg.zero_stage == 3:
                self.ref_model = wrap_reference_zero3(self.ref_model, cfg.micro_batch_size, self.world_size,
                                                      self.dtype)
        self.global_step = 0  # optimiser steps taken
        self.init_time_s = time.perf_counter() - t0

    # -- set-up -----------------------------------------------------------------------------------
    def _init_distributed(self, master_addr: str, master_port: int) -> None:
        backend = "nccl" if self.on_gpu else "gloo"
        if self.cfg.zero_stage > 0 or self.world_size > 1:
            os.environ.update(MASTER_ADDR=str(master_addr), MASTER_PORT=str(master_port), RANK=str(self.rank),
                              WORLD_SIZE=str(self.world_size), LOCAL_RANK="0" if self.on_gpu else str(self.rank))
            os.environ.setdefault("LOCAL_WORLD_SIZE", str(self.world_size))
        if self.cfg.zero_stage > 0:
            import deepspeed
            from deepspeed.accelerator import get_accelerator

            if not self.on_gpu:  # its CPU shared-memory all-reduce: a ~50 s JIT compile that buys nothing here
                deepspeed.ops.__compatible_ops__[get_accelerator().create_op_builder("ShareMemCommBuilder").NAME] = False
            deepspeed.init_distributed(dist_backend=backend)
        elif self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}",
                                    rank=self.rank, world_size=self.world_size)

    def _optimizer(self, model):
        """(model, DeepSpeed engine or None, optimizer, scheduler); weight decay on matrices only."""
        cfg = self.cfg
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [g for g in ({"params": [p for _, p in trainable if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                              {"params": [p for _, p in trainable if p.dim() < 2], "weight_decay": 0.0})
                  if g["params"]]
        if cfg.offload_optimizer and cfg.zero_stage > 0:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps, adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps,
                                          foreach=None if self.on_gpu else False)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_factory(cfg))
        if cfg.zero_stage == 0:
            return model, None, optimizer, scheduler
        import deepspeed

        engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                               lr_scheduler=scheduler, config=self._ds_config())
        return engine.module, engine, optimizer, scheduler

    def _ds_config(self) -> dict[str, Any]:
        cfg = self.cfg
        zero: dict[str, Any] = {"stage": cfg.zero_stage, "contiguous_gradients": True,
                                "overlap_comm": self.on_gpu, "reduce_bucket_size": 5e7}
        if cfg.zero_stage == 3:
            zero.update(stage3_param_persistence_threshold=10_000, stage3_max_live_parameters=1e9,
                        stage3_prefetch_bucket_size=5e7)
        if cfg.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": self.on_gpu}
        ds: dict[str, Any] = {  # gradient_accumulation_steps 1: the boundary is set by hand per step
            "train_micro_batch_size_per_gpu": cfg.micro_batch_size, "gradient_accumulation_steps": 1,
            "train_batch_size": cfg.micro_batch_size * self.world_size, "zero_optimization": zero,
            "gradient_clipping": float(max(cfg.grad_clip, 0.0)), "bf16": {"enabled": self.dtype == torch.bfloat16},
            "fp16": {"enabled": self.dtype == torch.float16}, "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9}
        if self.dtype in (torch.bfloat16, torch.float16):
            ds["data_types"] = {"grad_accum_dtype": "fp32"}
        return ds

    def _all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.world_size == 1 or not dist.is_initialized():
            return t
        dev = t.to(self.device)
        dist.all_reduce(dev, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return dev.to(t.device)

    def _barrier(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()

    def ping(self) -> dict[str, Any]:
        return {"rank": self.rank, "pid": os.getpid(), "device": str(self.device), "global_step": self.global_step,
                "init_time_s": round(self.init_time_s, 3)}

    # -- batches and log-probs --------------------------------------------------------------------
    def micro_batches(self, batch: TrainBatch) -> list[MicroBatch]:
        """``batch`` cut into ``micro_batch_size`` rows (whole groups where they fit) with their model inputs (prompt text and images through
        ``module.prepare_model_inputs``, once per prompt if shared), on the CPU: ``to_device`` moves one."""
        pidx, mask, out = batch.row_prompt_index(), batch.completion_mask.bool(), []
        for s, e in micro_cuts(pidx, self.cfg.micro_batch_size):
            cols = mask[s:e].any(dim=0).nonzero()
            t = int(cols.max()) + 1 if cols.numel() else 1  # trailing all-padding columns cut
            inputs, rows = build_micro_inputs(self.module, self.processor, batch.prompts_text, batch.images, pidx[s:e],
                                              self.cfg.shared_prefix and not self.cfg.gradient_checkpointing)

            def cut(x, s=s, e=e, t=t):
                return None if x is None else x[s:e, :t]

            out.append(MicroBatch(inputs, cut(batch.completion_ids), cut(batch.completion_mask).bool(),
                                  batch.advantages[s:e].float(), cut(batch.old_logprobs),
                                  cut(batch.ref_logprobs), cut(batch.sampling_logprobs), rows))
        return out

    def to_device(self, mb: MicroBatch) -> MicroBatch:
        """``mb`` on this rank's device (floating model inputs in the model's dtype); no copy if there."""
        inputs = {k: v.to(self.device, self.dtype if v.is_floating_point() else v.dtype) for k, v in mb.inputs.items()}
        return MicroBatch(inputs, *(None if x is None else x.to(self.device)
                                    for x in (mb.ids, mb.mask, mb.adv, mb.old, mb.ref, mb.samp, mb.rows)))

    def logprobs(self, mb: MicroBatch, reference: bool = False, entropy: bool = False):
        """Per-token log-probs ``[n, t]`` of ``mb``'s completions under the policy (or the
        reference model), ``(logprobs, entropy)`` with ``entropy``."""
        model, mb = self.ref_model if reference else (self.engine or self.model), self.to_device(mb)
        return per_token_logprobs(model, self.ref_module if reference else self.module, mb.inputs, mb.ids,
                                  mb.mask, temperature=self.cfg.temperature, return_entropy=entropy,
                                  suppress_ids=self.suppress_ids, rows=mb.rows)

    # -- the update -------------------------------------------------------------------------------
    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """``num_iterations`` optimiser steps on this rank's shard ``batch`` (collective). Returns
        the step's metrics reduced over all ranks (identical on every rank)."""
        if batch.num_rows == 0:
            raise ValueError("a learner rank received an empty batch shard")
        t0 = time.perf_counter()
        micros = self.micro_batches(batch)
        counts = self._global_counts(batch, len(micros))
        t1 = time.perf_counter()
        self._no_grad_pass(micros, counts["n_micro"])
        t2 = time.perf_counter()
        acc, extremes, grad_norms, lrs = self._update(micros, counts)
        t3 = time.perf_counter()
        return self._reduce_metrics(acc, extremes, grad_norms, lrs, counts,
                                    {"time/learner_s": t3 - t0, "time/learner_prepare_s": t1 - t0,
                                     "time/learner_ref_old_s": t2 - t1, "time/learner_optimize_s": t3 - t2})

    def _global_counts(self, batch: TrainBatch, n_local_micro: int) -> dict[str, Any]:
        """Rows and valid tokens of the whole step (all ranks), the micro-batch count every rank
        runs, and the Dr. GRPO length constant."""
        mask = batch.completion_mask.bool()
        sums = self._all_reduce(torch.tensor([float(batch.num_rows), float(mask.sum())], dtype=torch.float64))
        maxes = self._all_reduce(torch.tensor([float(n_local_micro), float(mask.shape[1])], dtype=torch.float64),
                                 op="max")
        return {"seqs": float(batch.global_num_seqs or sums[0]), "tokens": float(batch.global_num_tokens or sums[1]),
                "n_micro": int(maxes[0]), "len_norm": self.cfg.max_completion_length or int(maxes[1])}

    def _schedule(self, micros: list[MicroBatch], n_micro: int) -> Iterator[tuple[int, MicroBatch, bool]]:
        """(index, micro-batch moved to the device now, real): ranks with fewer micro-batches repeat
        their first one."""
        for j in range(n_micro):
            yield j, self.to_device(micros[j] if j < len(micros) else micros[0]), j < len(micros)

    @torch.no_grad()
    def _no_grad_pass(self, micros: list[MicroBatch], n_micro: int) -> None:
        """Old log-probs (μ > 1, when not given) and reference log-probs (β > 0), in place."""
        need_old = self.cfg.num_iterations > 1 and micros[0].old is None
        need_ref = self.cfg.beta > 0 and micros[0].ref is None
        if not (need_old or need_ref):
            return
        for j, mb, real in self._schedule(micros, n_micro):
            old = self.logprobs(mb).float() if need_old else None
            ref = self.logprobs(mb, reference=True).float() if need_ref else None
            if real:  # kept on the device: [n, t] each
                micros[j].old = old if need_old else micros[j].old
                micros[j].ref = ref if need_ref else micros[j].ref

    def _update(self, micros: list[MicroBatch], counts: dict[str, Any]):
        cfg, n_micro = self.cfg, counts["n_micro"]
        acc: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), dtype=torch.float64))
        extremes = [math.inf, -math.inf]  # ratio min / max
        grad_norms, lrs, nonfinite = [], [], 0
        for it in range(cfg.num_iterations):
            before = nonfinite
            lrs.append(float(self.optimizer.param_groups[0]["lr"]))  # the lr this optimiser step uses
            for j, mb, real in self._schedule(micros, n_micro):
                if self.engine is not None:
                    self.engine.set_gradient_accumulation_boundary(j == n_micro - 1)
                want_ent = cfg.compute_entropy and real
                logp, ent = self.logprobs(mb, entropy=True) if want_ent else (self.logprobs(mb), None)
                iw = None
                if cfg.tis_cap and mb.samp is not None:
                    iw = truncated_importance_weights(mb.old if mb.old is not None else logp.detach(), mb.samp,
                                                      cfg.tis_cap)
                if real and it == 0 and mb.samp is not None:  # ~0 when the sampler held these weights
                    acc["sampler_diff"] += ((logp.detach() - mb.samp).abs() * mb.mask).sum().double().cpu()
                    acc["sampler_tokens"] += mb.mask.sum().double().cpu()
                loss, m = grpo_loss(logp, mb.old, mb.adv, mb.mask, ref_logprobs=mb.ref, beta=cfg.beta,
                                    epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high,
                                    loss_agg=cfg.loss_agg, max_len_norm=counts["len_norm"],
                                    global_num_seqs=counts["seqs"], global_num_tokens=counts["tokens"],
                                    importance_weights=iw, loss_scale=self.world_size,
                                    importance_sampling_level="sequence" if cfg.algorithm == "gspo" else "token")
                if not real:
                    loss = loss * 0.0
                # A non-finite loss on any rank: this micro-batch contributes no gradient on every
                # rank (ranks must keep running the same collectives), and it is counted.
                bad = self._all_reduce(torch.tensor(float(not torch.isfinite(loss)), dtype=torch.float64), op="max")
                if float(bad) > 0:
                    nonfinite += 1
                    loss, real = logp.nan_to_num(0.0, 0.0, 0.0).sum() * 0.0, False
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
                        acc["entropy"] += (ent * mb.mask).sum().double().cpu()
                    acc["tokens"] += ntok
                    if ntok > 0:
                        extremes = [min(extremes[0], float(m["ratio_min"])), max(extremes[1], float(m["ratio_max"]))]
            grad_norms.append(self._optimizer_step(skip=nonfinite - before == n_micro))
            self.global_step += 1
        acc["nonfinite"] += nonfinite
        return acc, extremes, grad_norms, lrs

    def _optimizer_step(self, skip: bool) -> float:
        """Gradient norm of this optimiser step (DeepSpeed stepped at the boundary already). At
        stage 0: average gradients over ranks, clip, step; ``skip`` when nothing was finite."""
        if self.engine is not None:
            gn = self.engine.get_global_grad_norm()
            return float(gn) if gn is not None else float("nan")
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
            return float("nan")
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.world_size > 1 and dist.is_initialized():
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
            dist.all_reduce(flat)
            for p, g in zip(params, (flat / self.world_size).split([p.numel() for p in params])):
                p.grad = g.view_as(p).clone()
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def _reduce_metrics(self, acc, extremes, grad_norms, lrs, counts, timings) -> dict[str, float]:
        keys = ["pg_loss", "kl_loss", "ratio_mean", "clip_frac_low", "clip_frac_high", "clip_frac", "kl_mean",
                "entropy", "tokens", "sampler_diff", "sampler_tokens", "nonfinite"]
        tot = dict(zip(keys, self._all_reduce(torch.stack([acc[k] for k in keys])).tolist()))
        ext = self._all_reduce(torch.tensor([-extremes[0], extremes[1]], dtype=torch.float64), op="max")
        mu, ntok = self.cfg.num_iterations, max(tot["tokens"], 1.0)
        seconds = timings["time/learner_s"]
        metrics = {
            "loss/total": (tot["pg_loss"] + tot["kl_loss"]) / mu, "loss/pg": tot["pg_loss"] / mu,
            "loss/kl": tot["kl_loss"] / mu,
            "policy/ratio_mean": tot["ratio_mean"] / ntok, "policy/ratio_min": -float(ext[0]),
            "policy/ratio_max": float(ext[1]), "policy/clip_frac_low": tot["clip_frac_low"] / ntok,
            "policy/clip_frac_high": tot["clip_frac_high"] / ntok, "policy/clip_frac": tot["clip_frac"] / ntok,
            "optim/grad_norm": grad_norms[-1], "optim/grad_norm_mean": sum(grad_norms) / len(grad_norms),
            "optim/lr": lrs[-1], "optim/global_step": float(self.global_step),
            "learner/num_seqs": counts["seqs"], "learner/num_tokens": counts["tokens"],
            "learner/num_micro_batches": float(counts["n_micro"]),
            "learner/tokens_per_s": counts["tokens"] * mu / max(seconds, 1e-9),
            "faults/nonfinite_micro_batches": tot["nonfinite"] / self.world_size, **timings,
        }
        if self.cfg.beta > 0:
            metrics["policy/kl"] = tot["kl_mean"] / ntok
        if self.cfg.compute_entropy:
            metrics["policy/entropy"] = tot["entropy"] / ntok
        if tot["sampler_tokens"] > 0:
            metrics["policy/sampler_logprob_abs_diff"] = tot["sampler_diff"] / tot["sampler_tokens"]
        return metrics
