"""The single controller: places actors and runs the GRPO step loop.

    sample prompts -> rollout workers generate G completions each and score them
                   -> group-relative advantages -> learner update (DeepSpeed ranks)
                   -> weight sync (bucketed broadcast, versioned, verified) -> next step

``mode: sync`` is on-policy. ``mode: async`` is one-step off-policy: the prompts of step t+1 are
generated (with the weights of version t) while the learner updates on step t; staleness is recorded
per step and the clipped objective uses the sampler's log-probs as the behaviour policy.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..learner.grpo import group_advantages
from ..learner.types import LearnerConfig, TrainBatch
from ..rollout.types import RolloutBatch, SamplingConfig, concat_rollouts
from ..rollout.worker import EngineConfig
from . import placement
from .checkpoint import CheckpointManager, atomic_write_json, load_trainer_state, resolve_checkpoint
from .config import Config
from .metrics import MetricsLogger, ProgressBar
from .weight_sync import SyncGroupInfo, check_checksums, make_plan, node_ip_and_port

log = logging.getLogger("vlgrpo")


class StageError(RuntimeError):
    """A stage of the step (generate, update, sync, checkpoint) failed or timed out."""


@dataclass
class _Chunk:
    """One worker's share of a step's prompts; ``result`` once generated (retried if lost)."""

    index: int
    samples: list
    sampling: SamplingConfig
    worker: Any = None
    ref: Any = None
    result: Optional[RolloutBatch] = None
    retries: int = 0


class Trainer:
    def __init__(self, cfg: Config, resume: Optional[str] = None) -> None:
        self.cfg = cfg
        self.out = Path(cfg.trainer.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.resume_dir = resume
        self.step = 0
        self.version = 0
        self.workers: list[Any] = []
        self.worker_pgs: list[Any] = []
        self.learners: list[Any] = []
        self.learner_pg: Any = None
        self.sync_info: Optional[SyncGroupInfo] = None
        self.sync_transports: list[str] = []  # per worker: "shm" (learner's node, CPU) or "broadcast"
        self.synced_once: set[int] = set()  # worker ids that hold the frozen tensors already
        self._next_worker_id = 0
        self._pending: Optional[list[_Chunk]] = None  # generation of the next step (async mode)
        self.fault_counts: dict[str, int] = {"worker_replaced": 0, "prompts_retried": 0}

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        from ..rollout.data import DataSource, PromptSampler, load_datasets

        cfg = self.cfg
        torch.manual_seed(cfg.trainer.seed)
        random.seed(cfg.trainer.seed)
        self.model_path = self._model_path()
        template = {"question_template": cfg.data.question_template}
        sources = [DataSource(**{**template, **s}) for s in cfg.data.sources] or \
            [DataSource(self._synthetic_data(), **template)]
        self.dataset = load_datasets(sources)
        self.sampler = PromptSampler(self.dataset, cfg.trainer.prompts_per_step, seed=cfg.trainer.seed)
        cfg.save(self.out / "config.yaml")

        needed = cfg.learner.num_ranks * cfg.learner.cpus_per_rank + cfg.rollout.num_workers * cfg.rollout.cpus_per_worker
        placement.init_ray(cfg.trainer.ray_address, needed)
        self.has_gpus = placement.cluster_gpus() > 0
        self.sync_backend = cfg.sync.backend if cfg.sync.backend != "auto" else ("nccl" if self.has_gpus else "gloo")
        self._start_learners()
        for _ in range(cfg.rollout.num_workers):
            self._start_worker()
        self._call(self.workers, "health", stage="start rollout workers")

        ckpt = resolve_checkpoint(self.resume_dir) if self.resume_dir else None
        if ckpt is not None:
            state = load_trainer_state(ckpt)
            self._call(self.learners, "load_checkpoint", str(ckpt / "learner"), stage="resume learner")
            self.step, self.version = int(state["step"]), int(state["weights_version"])
            self.sampler.load_state_dict(state["sampler"])
            log.info("resumed from %s at step %d", ckpt, self.step)
        self.metrics = MetricsLogger(self.out, use_tensorboard=cfg.trainer.tensorboard,
                                     resume_from_step=self.step if ckpt is not None else None)
        self.checkpoints = CheckpointManager(self.out, keep_last=cfg.trainer.keep_checkpoints)
        self._rebuild_sync_group()
        self.sync_weights(full=True)  # every worker starts from the learner's weights

    def _model_path(self) -> str:
        m = self.cfg.model
        if m.path:
            return m.path
        from ..modules.tiny import build_tiny_model

        path = self.out / "base_model"
        if not (path / "config.json").exists():
            log.info("model.path is empty: building a tiny %s model in %s", m.tiny_family, path)
            build_tiny_model(m.tiny_family, path, seed=self.cfg.trainer.seed, size=m.tiny_size)
        return str(path)

    def _synthetic_data(self) -> str:
        from ..rollout.synthetic import make_dataset

        d = self.cfg.data
        path = self.out / "data" / d.synthetic_task
        if not (path / "data.jsonl").exists():
            make_dataset(d.synthetic_task, d.synthetic_size, path, seed=self.cfg.trainer.seed)
        return str(path / "data.jsonl")

    def _learner_config(self) -> LearnerConfig:
        from dataclasses import fields

        lc = self.cfg.learner
        base = {f.name: getattr(lc, f.name) for f in fields(LearnerConfig)}
        base.update(model_path=self.model_path, module=self.cfg.model.module,
                    processing_kwargs=dict(self.cfg.model.processing_kwargs),
                    temperature=self.cfg.rollout.temperature,
                    max_completion_length=lc.max_completion_length or self.cfg.rollout.max_tokens,
                    total_steps=lc.total_steps if lc.total_steps != 1000 else self.cfg.trainer.total_steps * lc.num_iterations)
        return LearnerConfig(**base)

    def _start_learners(self) -> None:
        import ray

        from .actors import learner_actor_class

        n = self.cfg.learner.num_ranks
        res = placement.learner_resources(self.cfg, self.has_gpus)
        self.learner_pg = placement.placement_group([placement.bundle(res)] * n, "PACK", self.cfg.trainer.timeout_s)
        probe = ray.remote(num_cpus=0)(node_ip_and_port).options(
            scheduling_strategy=placement.bundle_strategy(self.learner_pg, 0))
        addr, port = ray.get(probe.remote())
        cls = learner_actor_class()
        lcfg = self._learner_config()
        self.learners = [
            cls.options(num_cpus=res.cpus, num_gpus=res.gpus,
                        scheduling_strategy=placement.bundle_strategy(self.learner_pg, r)).remote(lcfg, r, n, addr, port)
            for r in range(n)
        ]
        self._call(self.learners, "ping", stage="start learners")

    def _start_worker(self) -> Any:
        from .actors import rollout_actor_class

        r = self.cfg.rollout
        res = placement.worker_resources(self.cfg, self.has_gpus)
        pg = placement.placement_group([placement.bundle(res)], "PACK", self.cfg.trainer.timeout_s)
        ecfg = EngineConfig(model_path=self.model_path, module=self.cfg.model.module, engine=r.engine, dtype=r.dtype,
                            processing_kwargs=dict(self.cfg.model.processing_kwargs),
                            tensor_parallel_size=r.tensor_parallel_size,
                            gpu_memory_utilization=r.gpu_memory_utilization, max_model_len=r.max_model_len,
                            enforce_eager=r.enforce_eager, num_threads=r.num_threads,
                            seed=self.cfg.trainer.seed + self._next_worker_id)
        actor = rollout_actor_class().options(
            num_cpus=res.cpus, num_gpus=res.gpus, scheduling_strategy=placement.bundle_strategy(pg, 0),
        ).remote(ecfg, list(r.rewards), self._next_worker_id)
        actor._vlgrpo_id = self._next_worker_id  # noqa: SLF001 (driver-side bookkeeping)
        self._next_worker_id += 1
        self.workers.append(actor)
        self.worker_pgs.append(pg)
        return actor

    # ------------------------------------------------------------------ calls with bounds
    def _get(self, refs, stage: str, timeout: Optional[float] = None):
        import ray

        try:
            return ray.get(refs, timeout=timeout or self.cfg.trainer.timeout_s)
        except ray.exceptions.GetTimeoutError as e:
            raise StageError(f"{stage}: no answer within {timeout or self.cfg.trainer.timeout_s:.0f}s "
                             "(trainer.timeout_s); a worker or collective is hung") from e
        except ray.exceptions.RayError as e:
            raise StageError(f"{stage} failed: {e}") from e

    def _call(self, actors, method: str, *args, stage: str, **kwargs):
        return self._get([getattr(a, method).remote(*args, **kwargs) for a in actors], stage)

    # ------------------------------------------------------------------ weight sync
    def _rebuild_sync_group(self) -> None:
        """(Re)form the sync group: learner rank 0 + current workers. Called when membership changes."""
        import ray

        if self.sync_info is not None:
            self._call(self.learners[:1], "leave_sync_group", stage="leave sync group")
            self._call(self.workers, "leave_sync_group", stage="leave sync group")
        addr, port = ray.get(ray.remote(num_cpus=0)(node_ip_and_port).options(
            scheduling_strategy=placement.bundle_strategy(self.learner_pg, 0)).remote())
        ranks = self._get([w.sync_ranks.remote() for w in self.workers], "form the weight-sync group")
        nodes = [h["node_ip"] for h in self._get([w.health.remote() for w in self.workers], "form the weight-sync group")]
        first = [1 + sum(ranks[:i]) for i in range(len(ranks))]  # a TP=k engine takes k ranks
        shm = self._shm_workers(addr, nodes)
        shm_ranks = tuple(r for i in shm for r in range(first[i], first[i] + ranks[i]))
        handle = self._get([self.learners[0].share_weights.remote()], "share the learner's weights")[0] if shm else None
        self.sync_info = SyncGroupInfo(addr, port, 1 + sum(ranks), self.sync_backend,
                                       name=f"wsync-{port}-{len(self.workers)}", timeout_s=self.cfg.sync.timeout_s,
                                       shm_ranks=shm_ranks, shm_handle=handle)
        self.sync_transports = ["shm" if i in shm else "broadcast" for i in range(len(self.workers))]
        refs = [self.learners[0].join_sync_group.remote(self.sync_info)]
        refs += [w.join_sync_group.remote(self.sync_info, r) for w, r in zip(self.workers, first)]
        self._get(refs, "form the weight-sync group")

    def _shm_workers(self, learner_ip: str, worker_ips: list[str]) -> list[int]:
        """Indices of the workers that read the learner's weights from shared memory: those on
        its node, when weights are on the CPU (gloo) and ``sync.transport`` allows it."""
        transport = self.cfg.sync.transport
        if transport == "broadcast" or self.sync_backend != "gloo" or self.has_gpus:
            if transport == "shm":
                raise StageError("sync.transport=shm needs CPU weights and sync.backend gloo; this cluster has GPUs "
                                 "or NCCL: use sync.transport=auto")
            return []
        local = [i for i, ip in enumerate(worker_ips) if ip == learner_ip]
        if transport == "shm" and len(local) < len(worker_ips):
            far = sorted({ip for ip in worker_ips if ip != learner_ip})
            raise StageError(f"sync.transport=shm but rollout workers run on {far}, not on the learner's node "
                             f"{learner_ip}: use sync.transport=auto (shared memory where possible, broadcast elsewhere)")
        return local

    def sync_weights(self, full: bool = False) -> dict[str, float]:
        """Broadcast the learner's weights to every worker as version ``self.version``. A worker
        that died meanwhile is replaced and the sync is repeated for everyone (once)."""
        try:
            return self._sync_weights(full)
        except StageError:
            dead = self._dead_workers()
            if not dead:
                raise
            log.warning("weight sync v%d: %d rollout worker(s) died; replacing them and syncing again",
                        self.version, len(dead))
            for w in dead:
                self._replace_worker(w, sync=False)
            self._rebuild_sync_group()
            return self._sync_weights(full=True)

    def _dead_workers(self) -> list:
        import ray

        dead = []
        for w in self.workers:
            try:
                ray.get(w.health.remote(), timeout=30)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError,
                    ray.exceptions.ActorUnavailableError):
                dead.append(w)
        return dead

    def _sync_weights(self, full: bool = False) -> dict[str, float]:
        """One broadcast; frozen tensors travel only when some worker has never received them."""
        full = full or any(w._vlgrpo_id not in self.synced_once for w in self.workers)
        specs = self._get(self.learners[0].weight_specs.remote(trainable_only=not full), "sync: list weights")
        plan = make_plan(specs, self.version, self.cfg.sync.bucket_mb, verify=self.cfg.sync.verify)
        t0 = time.perf_counter()
        send = [l.send_weights.remote(plan) for l in self.learners]
        recv = [w.receive_weights.remote(plan) for w in self.workers]
        results = self._get(send + recv, f"weight sync v{self.version}", timeout=self.cfg.sync.timeout_s)
        seconds = time.perf_counter() - t0
        stats, received = results[0], results[len(send):]
        if plan.verify:
            check_checksums(stats.checksums, {f"rollout worker {r['worker']}": r["checksums"] for r in received},
                            self.version)
        for r in received:
            if r["version"] != self.version:
                raise StageError(f"rollout worker {r['worker']} reports weights v{r['version']} after sync v{self.version}")
        self.synced_once.update(w._vlgrpo_id for w in self.workers)
        return {"sync/seconds": seconds, "sync/mb": plan.nbytes / 2**20,
                "sync/staged_mb": stats.copied_bytes / 2**20,
                "sync/shm_workers": float(self.sync_transports.count("shm")),
                "sync/mb_per_s": plan.nbytes / 2**20 / max(seconds, 1e-9), "sync/tensors": len(plan.names),
                "sync/full": float(full)}

    # ------------------------------------------------------------------ scaling
    def scale_rollout(self, num_workers: int) -> None:
        """Add or remove rollout workers between steps; new workers get the current weights first."""
        import ray

        if num_workers < 1:
            raise ValueError("need at least one rollout worker")
        self._drain_pending()
        while len(self.workers) > num_workers:
            w, pg = self.workers.pop(), self.worker_pgs.pop()
            ray.kill(w)
            ray.util.remove_placement_group(pg)
        while len(self.workers) < num_workers:
            self._start_worker()
        self._call(self.workers, "health", stage="start rollout workers")
        self._rebuild_sync_group()
        self.sync_weights()
        self.cfg.rollout.num_workers = num_workers
        log.info("rollout workers: %d", num_workers)

    def _apply_control_requests(self) -> None:
        """Between steps: act on ``vlgrpo scale`` requests (``OUTPUT_DIR/control/scale.json``)."""
        from .control import take_scale_request

        n = take_scale_request(self.out)
        if n is not None and n != len(self.workers):
            self.scale_rollout(n)

    def _drain_pending(self) -> None:
        """Collect in-flight generation now (before workers change); kept for the next step."""
        if self._pending is not None:
            self._collect(self._pending, "finish in-flight generation")

    # ------------------------------------------------------------------ generation with retries
    def _sampling(self, step: int, chunk: int) -> SamplingConfig:
        """Sampling of one chunk. The seed depends only on (run seed, step, chunk), so a resumed
        run, or a chunk retried on another worker, samples exactly what it would have."""
        r = self.cfg.rollout
        seed = (self.cfg.trainer.seed * 1_000_003 + step * 1_009 + chunk) % 2**31
        return SamplingConfig(n=r.group_size, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                              max_tokens=r.max_tokens, seed=seed)

    def _launch_generation(self, step: int) -> list["_Chunk"]:
        """Draw the prompts of step ``step`` (0-based) and start generating them on the workers."""
        # The sampler state *before* this draw: a checkpoint taken while these prompts are still
        # in flight (async mode) must let a resumed run draw them again.
        self._sampler_state_undrawn = self.sampler.state_dict()
        samples = next(self.sampler)
        k = len(self.workers)
        chunks = [_Chunk(i, samples[i::k], self._sampling(step, i)) for i in range(k) if samples[i::k]]
        for chunk, worker in zip(chunks, self.workers):  # round-robin: chunk sizes differ by <= 1
            self._submit(chunk, worker)
        return chunks

    def _submit(self, chunk: "_Chunk", worker) -> None:
        chunk.worker, chunk.ref = worker, worker.generate.remote(chunk.samples, chunk.sampling)

    def _collect(self, chunks: list["_Chunk"], stage: str) -> list[RolloutBatch]:
        """Wait for every chunk. A worker that dies (or answers nothing within trainer.timeout_s)
        is replaced by a new one that first receives the current weights, and its chunk is
        generated again there with the same seed: no prompt is dropped."""
        import ray

        deadline = time.monotonic() + self.cfg.trainer.timeout_s
        while any(c.result is None for c in chunks):
            waiting = {c.ref: c for c in chunks if c.result is None}
            ready, _ = ray.wait(list(waiting), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:  # hung: treat the workers still generating as dead
                for c in waiting.values():
                    self._retry_elsewhere(c, f"no answer within {self.cfg.trainer.timeout_s:.0f}s", stage)
                deadline = time.monotonic() + self.cfg.trainer.timeout_s
                continue
            chunk = waiting[ready[0]]
            try:
                chunk.result = ray.get(ready[0])
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                self._retry_elsewhere(chunk, type(e).__name__, stage)
            except ray.exceptions.RayTaskError as e:
                raise StageError(f"{stage}: rollout worker failed: {e}") from e
        return [c.result for c in chunks]

    def _retry_elsewhere(self, chunk: "_Chunk", why: str, stage: str) -> None:
        if chunk.retries >= self.cfg.trainer.max_retries:
            raise StageError(f"{stage}: prompts {[s.sample_id for s in chunk.samples]} failed "
                             f"{chunk.retries + 1} times ({why}); giving up (trainer.max_retries)")
        log.warning("%s: rollout worker lost (%s); replacing it and retrying %d prompts",
                    stage, why, len(chunk.samples))
        replacement = self._replace_worker(chunk.worker)
        chunk.retries += 1
        self.fault_counts["prompts_retried"] += len(chunk.samples)
        self._submit(chunk, replacement)

    def _replace_worker(self, dead, sync: bool = True) -> Any:
        """Swap ``dead`` for a fresh worker (holding the current weights when ``sync``);
        idempotent per worker."""
        import ray

        if dead not in self.workers:  # already replaced for another chunk
            return self.workers[-1]
        i = self.workers.index(dead)
        pg = self.worker_pgs.pop(i)
        self.workers.pop(i)
        self.synced_once.discard(dead._vlgrpo_id)
        try:
            ray.kill(dead)
        except Exception:  # already dead
            pass
        ray.util.remove_placement_group(pg)
        new = self._start_worker()
        self._call([new], "health", stage="start replacement rollout worker")
        self.fault_counts["worker_replaced"] += 1
        if sync:
            self._rebuild_sync_group()
            self.sync_weights()
        return new

    def _to_train_batch(self, rollout: RolloutBatch, off_policy: bool) -> tuple[TrainBatch, dict[str, float]]:
        lc = self.cfg.learner
        rewards = rollout.total_rewards()
        adv, zero_groups = group_advantages(rewards, rollout.group_size, scale_by_std=lc.scale_adv_by_std)
        batch = TrainBatch.from_rollout(rollout, adv)
        if off_policy:  # behaviour policy = the sampler's weights (one version behind)
            batch.old_logprobs = rollout.sampling_logprobs
        return batch, {"zero_std_groups": float(zero_groups)}

    def train_step(self) -> dict[str, float]:
        t_step = time.perf_counter()
        asynchronous = self.cfg.trainer.mode == "async"
        t0 = time.perf_counter()
        chunks = self._pending if self._pending is not None else self._launch_generation(self.step)
        self._pending = None
        rollout = concat_rollouts(self._collect(chunks, f"step {self.step}: generate"))
        t_gen = time.perf_counter() - t0
        staleness = self.version - rollout.weights_version
        for reason, ids in rollout.skipped_prompts.items():
            self.fault_counts[f"prompts_{reason}"] = self.fault_counts.get(f"prompts_{reason}", 0) + len(ids)
            log.warning("step %d: %d prompts skipped (%s): %s", self.step, len(ids), reason, ids[:5])
        if asynchronous and self.step + 1 < self.cfg.trainer.total_steps:
            self._pending = self._launch_generation(self.step + 1)  # overlaps the update below
        if rollout.completion_ids.shape[0] == 0:
            raise StageError(f"step {self.step}: every prompt of the batch was skipped; see the warnings above")
        batch, extra = self._to_train_batch(rollout, off_policy=staleness > 0)
        t0 = time.perf_counter()
        shards = batch.split(len(self.learners))
        learner_metrics = self._get([l.train_step.remote(s) for l, s in zip(self.learners, shards)],
                                    f"step {self.step}: learner update")[0]
        t_train = time.perf_counter() - t0
        self.version += 1
        self.step += 1
        sync_metrics = self.sync_weights()
        metrics = self._step_metrics(rollout, learner_metrics, sync_metrics, extra)
        metrics.update({"time/generate_s": t_gen, "time/train_s": t_train, "staleness/mean": float(staleness),
                        "time/step_s": time.perf_counter() - t_step})
        return metrics

    def _step_metrics(self, rollout: RolloutBatch, learner: dict, sync: dict, extra: dict) -> dict[str, float]:
        total = rollout.total_rewards()
        m: dict[str, float] = {"step": self.step, "weights_version": self.version,
                               "rollout/weights_version": rollout.weights_version,
                               "reward/mean": float(total.mean()), "reward/std": float(total.std())}
        for j, name in enumerate(rollout.reward_names):
            m[f"reward/{name}"] = float(rollout.rewards[:, j].mean())
        if "accuracy" in rollout.reward_names:
            m["accuracy"] = m["reward/accuracy"]
        lengths = rollout.completion_mask.sum(1).float()
        m["response_length/mean"] = float(lengths.mean())
        m["response_length/clipped_frac"] = sum(f == "length" for f in rollout.finish_reasons) / len(rollout.finish_reasons)
        m["reward/errors"] = float(sum(rollout.reward_errors.values()))
        m["data/skipped"] = float(self.dataset.num_skipped + getattr(self.sampler, "num_skipped", 0))
        m["rollout/tokens_per_s"] = rollout.timings.get("completion_tokens", 0.0) / max(rollout.timings.get("generate_s", 0.0), 1e-9)
        m.update({k: float(v) for k, v in learner.items() if isinstance(v, (int, float))})
        m.update(sync)
        m.update(extra)
        m.update({f"faults/{k}": float(v) for k, v in self.fault_counts.items()})
        return m

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        tmp = self.checkpoints.begin(self.step)
        self._call(self.learners, "save_checkpoint", str(tmp / "learner"), stage="checkpoint: learner state")
        self._call(self.learners, "save_pretrained", str(tmp / "policy"), stage="checkpoint: policy")
        atomic_write_json(tmp / "trainer_state.json", {
            "step": self.step, "weights_version": self.version, "sampler": self._sampler_state_undrawn if self._pending else self.sampler.state_dict(),
            "seed": self.cfg.trainer.seed, "num_workers": len(self.workers)})
        return self.checkpoints.commit(self.step, tmp)

    # ------------------------------------------------------------------ the loop
    def run(self) -> list[dict[str, float]]:
        cfg = self.cfg.trainer
        history = []
        bar = ProgressBar(cfg.total_steps, initial=self.step)
        try:
            while self.step < cfg.total_steps:
                self._apply_control_requests()
                metrics = self.train_step()
                self.metrics.log(self.step, metrics)
                bar.update(self.step, metrics)
                history.append(metrics)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.total_steps:
                    self.save_checkpoint()
            self._drain_pending()
            self.save_checkpoint()
        finally:
            bar.close()
            self.metrics.close()
        return history

    def shutdown(self) -> None:
        import ray

        for a in self.workers + self.learners:
            try:
                ray.kill(a)
            except Exception:  # already gone
                pass
        for pg in self.worker_pgs + [getattr(self, "learner_pg", None)]:
            if pg is not None:
                ray.util.remove_placement_group(pg)
        self.workers, self.learners, self.worker_pgs, self.learner_pg = [], [], [], None


def train(cfg: Config, resume: Optional[str] = None) -> list[dict[str, float]]:
    """Run a whole training job; returns the per-step metrics."""
    trainer = Trainer(cfg, resume=resume)
    try:
        trainer.setup()
        return trainer.run()
    finally:
        trainer.shutdown()
