"""The driver: sets a run up and runs the GRPO step loop (generate, advantages, update, sync; ``trainer.mode`` sync
or one-step off-policy async); the fleet owns the actors. Design: docs/design.md#the-step-loop."""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any, Optional

from ..learner.grpo import group_advantages
from ..learner.types import TrainBatch
from ..modules.loading import read_model_config
from ..modules.registry import resolve_module
from ..modules.tiny import build_tiny_model, warm_up_format
from ..rollout.data import PromptSampler, load_datasets
from ..rollout.synthetic import make_dataset
from ..rollout.types import RolloutBatch, SamplingConfig, concat_rollouts
from . import placement
from .checkpoint import CheckpointManager, atomic_write_json, load_trainer_state, resolve_checkpoint
from .config import TEST_SPLIT_SEED, Config, ConfigError
from .control import take_scale_request
from .fleet import Chunk, Fleet, StageError
from .metrics import MetricsLogger

log = logging.getLogger("vlgrpo")


class Trainer:
    def __init__(self, cfg: Config, resume: Optional[str] = None) -> None:
        self.cfg, self.resume = cfg, resume
        self.out = Path(cfg.trainer.output_dir)
        self.step = 0  # steps done
        self.version = 0  # weights version the learners hold
        self.pending: Optional[list[Chunk]] = None  # generation of the next step (async mode)
        self.sampler_state_undrawn: Any = None  # the sampler before the pending draw
        self.fleet: Optional[Fleet] = None
        self.metrics: Optional[MetricsLogger] = None

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        d, t = cfg.data, cfg.trainer
        try:  # user errors found before any actor starts: one line each (cli prints ConfigError so)
            self.dataset = load_datasets(cfg.data.data_sources(self._demo_data()))
            val = (d.val_sources or ([] if d.sources else [{"path": self._demo_data(True)}])) if t.val_every else []
            val = type(d)(val, question_template=d.question_template).data_sources() if val else []  # with the template
            self.val_set = load_datasets(val) if val else None
            self._demo_model()
            read_model_config(cfg.model.path)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(str(e)) from e
        self.sampler = PromptSampler(self.dataset, cfg.trainer.prompts_per_step, seed=cfg.trainer.seed)
        cfg.save(self.out / "config.yaml")  # exactly what runs (resolved model path and derived values)

        placement.init_ray(cfg.trainer.ray_address, cfg.learner.num_ranks * cfg.learner.cpus_per_rank
                           + cfg.rollout.num_workers * cfg.rollout.cpus_per_worker)
        self.fleet = fleet = Fleet(cfg)
        log.info("starting %d learner rank(s) (ZeRO stage %d)", cfg.learner.num_ranks, cfg.learner.zero_stage)
        fleet.start_learners()
        log.info("starting %d rollout worker(s)", cfg.rollout.num_workers)
        fleet.start_workers(cfg.rollout.num_workers)
        self.first_sampler_state = self.sampler.state_dict()
        ckpt = resolve_checkpoint(self.resume) if self.resume else None
        self.restore(ckpt)
        self.metrics = MetricsLogger(self.out, cfg.metrics, cfg.trainer.total_steps,
                                     resume_from_step=self.step if ckpt is not None else None,
                                     run_config=cfg.to_dict())
        self.checkpoints = CheckpointManager(self.out, keep_last=cfg.trainer.keep_checkpoints)
        log.info("first weight sync (%s transport)", cfg.sync.transport)
        fleet.form_sync_group()
        fleet.sync(self.version, full=True)  # every worker starts from the learners' weights

    def restore(self, ckpt: Optional[Path]) -> None:
        """Learners, step, weights version and data order as of ``ckpt`` (None: the start of the run)."""
        state = load_trainer_state(ckpt) if ckpt else {"step": 0, "weights_version": 0, "sampler": self.first_sampler_state}
        if ckpt is not None:
            self.fleet.call(self.fleet.learners, "load_checkpoint", str(ckpt / "learner"), stage="resume learner")
            log.info("resumed from %s at step %d", ckpt, state["step"])
        self.step, self.version = int(state["step"]), int(state["weights_version"])
        self.sampler.load_state_dict(state["sampler"])

    def recover_learners(self, error: StageError) -> None:
        """A learner rank died or hangs: restart the learner group from the last complete checkpoint
        (up to ``trainer.max_restarts`` times), re-form the sync group and go on from there."""
        fleet, t0 = self.fleet, time.perf_counter()
        if fleet.learners_alive() or fleet.faults["learner_restarts"] >= self.cfg.trainer.max_restarts:
            raise error
        ckpt = self.checkpoints.latest()
        log.warning("%s\nrestarting the learner group from %s", error, ckpt or "the start of the run")
        fleet.restart_learners()
        self.pending = None  # drawn again from the restored sampler
        self.restore(ckpt)
        self.metrics.close()  # its records after the restored step are dropped (they are trained again)
        self.metrics = MetricsLogger(self.out, self.cfg.metrics, self.cfg.trainer.total_steps,
                                     resume_from_step=self.step, run_config=self.cfg.to_dict())
        fleet.form_sync_group()
        fleet.sync(self.version, full=True)
        fleet.faults["learner_restarts"] += 1
        fleet.faults["recovery_s"] += time.perf_counter() - t0

    def _demo_data(self, test: bool = False) -> Path:
        """The synthetic task's data (``data.sources`` empty), built once in the run; ``test``: its held-out split."""
        d, t = self.cfg.data, self.cfg.trainer
        data = self.out / "data" / (d.synthetic_task + "-test" * test)
        if not d.sources and not (data / "data.jsonl").exists():
            make_dataset(d.synthetic_task, (d.synthetic_size, t.val_size)[test], data, t.seed + TEST_SPLIT_SEED * test)
        return data / "data.jsonl"

    def _demo_model(self) -> None:
        """An empty ``model.path`` is a tiny model built once in the run (resolved here, so
        config.yaml names it), warmed up to the data's answer format but not to its task."""
        m, seed = self.cfg.model, self.cfg.trainer.seed
        if m.path:
            return
        m.path = str(self.out / "base_model")
        if (self.out / "base_model" / "config.json").exists():
            return
        tmp = self.out / "base_model.building"
        log.info("building a tiny %s model in %s (model.path is empty)", m.tiny_family, m.path)
        build_tiny_model(m.tiny_family, tmp, seed=seed, size=m.tiny_size, tied=m.tiny_tied)
        if m.tiny_warmup_steps:
            t0 = time.perf_counter()
            rows = [s for s in map(self.dataset.get, range(min(len(self.dataset), 512))) if s is not None]
            loss = warm_up_format(tmp, resolve_module(str(tmp), m.module), [s.prompt for s in rows],
                                  [s.images for s in rows], [s.solution for s in rows], m.tiny_warmup_steps, seed=seed)
            log.info("warmed the tiny model up to the answer format (%d steps, answers shuffled across rows, "
                     "loss %.3f, %.0f s)", m.tiny_warmup_steps, loss, time.perf_counter() - t0)
        tmp.rename(m.path)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, float]:
        timings: dict[str, float] = {}
        t_step = time.perf_counter()

        @contextlib.contextmanager
        def phase(name: str):
            t0 = time.perf_counter()
            yield
            timings[f"time/{name}_s"] = time.perf_counter() - t0

        with phase("generate"):
            rollout, sampling = self.generate()
        self.metrics.log_samples(self.step + 1, rollout, self.dataset)
        with phase("advantages"):
            batch, extra = self.advantages(rollout)
        with phase("update"):
            learner_metrics = self.update(batch)
        with phase("sync"):
            sync_metrics = self.sync()
        timings["time/step_s"] = time.perf_counter() - t_step
        return {**self.step_metrics(rollout), **learner_metrics, **sync_metrics, **extra, **sampling, **timings}

    def generate(self) -> tuple[RolloutBatch, dict[str, float]]:
        """This step's rollouts (launched by the previous step in async mode), refilled by dynamic
        sampling; in async mode also launch the next step's, to overlap the update."""
        chunks = self.pending or self.launch(self.step)
        self.pending = None
        rollout, extra = self.dynamic_sampling(self.collect(chunks))
        if self.cfg.trainer.mode == "async" and self.step + 1 < self.cfg.trainer.total_steps:
            self.pending = self.launch(self.step + 1)
        if rollout.completion_ids.shape[0] == 0:
            raise StageError(f"step {self.step}: every prompt of the batch was skipped; see the warnings above")
        return rollout, extra

    def collect(self, chunks: list[Chunk]) -> RolloutBatch:
        rollout = concat_rollouts(self.fleet.collect(chunks, f"step {self.step}: generate", self.version))
        for reason, ids in rollout.skipped_prompts.items():
            self.fleet.faults[f"prompts_{reason}"] += len(ids)
            log.warning("step %d: %d prompts skipped (%s): %s", self.step, len(ids), reason, ids[:5])
        return rollout

    def dynamic_sampling(self, rollout: RolloutBatch) -> tuple[RolloutBatch, dict[str, float]]:
        """DAPO dynamic sampling (``trainer.dynamic_sampling_rounds`` > 0): a group whose rewards are
        all equal has no advantage, so it is dropped and a new batch of prompts is generated, up to
        that many extra rounds, until ``prompts_per_step`` groups are kept (the surplus is dropped)."""
        t, kept, dropped, have = self.cfg.trainer, [], 0, 0
        if not t.dynamic_sampling_rounds:
            return rollout, {}
        for r in range(t.dynamic_sampling_rounds + 1):
            rollout = self.collect(self.launch(self.step, r)) if r else rollout
            rewards = rollout.total_rewards().view(-1, rollout.group_size)
            spread = (rewards.max(1).values > rewards.min(1).values).nonzero().flatten().tolist()
            dropped, have = dropped + rewards.shape[0] - len(spread), have + len(spread)
            kept.append(rollout.groups(spread))
            if have >= t.prompts_per_step:
                break
        n = min(have, t.prompts_per_step)
        if n < t.prompts_per_step:  # none at all: the last round trains (its advantages are all 0)
            log.warning("step %d: %d groups with a reward spread after %d extra rounds", self.step, n, r)
        return concat_rollouts(kept).groups(range(n)) if n else rollout, {
            "sampling/extra_rounds": float(r), "sampling/dropped_groups": float(dropped), "sampling/kept_groups": float(n)}

    def launch(self, step: int, round_: int = 0) -> list[Chunk]:
        """Draw the prompts of ``step`` (dynamic sampling's extra ``round_``) and start generating them.
        Each chunk's seed depends only on (run seed, step, round, chunk), so a resumed run or a
        retried chunk samples exactly the same."""
        self.sampler_state_undrawn = self.sampler.state_dict()  # a checkpoint meanwhile draws them again
        r, seed = self.cfg.rollout, self.cfg.trainer.seed
        sampling = [SamplingConfig(n=r.group_size, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                   max_tokens=r.max_tokens,
                                   seed=(seed * 1_000_003 + step * 1_009 + round_ * 100_003 + i) % 2**31)
                    for i in range(len(self.fleet.slots))]
        return self.fleet.launch(next(self.sampler), sampling)

    def advantages(self, rollout: RolloutBatch) -> tuple[TrainBatch, dict[str, float]]:
        lc = self.cfg.learner
        adv, zero_groups = group_advantages(rollout.total_rewards(), rollout.group_size,
                                            leave_one_out=lc.algorithm == "rloo", scale_by_std=lc.algorithm != "rloo"
                                            if lc.scale_adv_by_std is None else lc.scale_adv_by_std)
        batch = TrainBatch.from_rollout(rollout, adv)
        if rollout.weights_version < self.version:  # off-policy: the behaviour policy is the sampler's
            batch.old_logprobs = rollout.sampling_logprobs
        return batch, {"reward/zero_std_groups": zero_groups * rollout.group_size / len(adv),  # a fraction
                       "staleness/mean": float(self.version - rollout.weights_version)}

    def update(self, batch: TrainBatch) -> dict[str, float]:
        """One GRPO update on the learner ranks: the learners now hold the next weights version."""
        metrics = self.fleet.update(batch, f"step {self.step}: learner update")
        self.version, self.step = self.version + 1, self.step + 1
        return metrics

    def validate(self) -> dict[str, float]:
        """The current weights' greedy answers (one per prompt, as verl) to the validation prompts, scored: val/*."""
        t0, t, ds = time.perf_counter(), self.cfg.trainer, self.val_set
        samples = next(PromptSampler(ds, min(len(ds), t.val_size), seed=t.seed))  # the same val_size rows each time
        sampling = SamplingConfig(n=1, temperature=0.0, max_tokens=self.cfg.rollout.max_tokens, seed=t.seed)
        chunks = self.fleet.launch(samples, [sampling] * len(self.fleet.slots))
        val = concat_rollouts(self.fleet.collect(chunks, f"step {self.step}: validate", self.version))
        self.metrics.log_samples(self.step, val, self.val_set, split="val")
        return {"val/reward_mean": float(val.total_rewards().mean()), "time/validate_s": time.perf_counter() - t0,
                **{f"val/{n}": float(val.rewards[:, j].mean()) for j, n in enumerate(val.reward_names)}}

    def sync(self) -> dict[str, float]:
        return self.fleet.sync(self.version)

    def step_metrics(self, rollout: RolloutBatch) -> dict[str, float]:
        total, lengths = rollout.total_rewards(), rollout.completion_mask.sum(1).float()
        return {"step": self.step, "sync/version": self.version, "rollout/weights_version": rollout.weights_version,
                "reward/mean": float(total.mean()), "reward/std": float(total.std()),
                **{f"reward/{n}": float(rollout.rewards[:, j].mean()) for j, n in enumerate(rollout.reward_names)},
                "response_length/mean": float(lengths.mean()),
                "response_length/clipped_frac": sum(f == "length" for f in rollout.finish_reasons) / len(lengths),
                "reward/errors": float(sum(rollout.reward_errors.values())),
                "data/skipped": float(self.dataset.num_skipped),
                "rollout/tokens_per_s": rollout.timings.get("completion_tokens", 0.0)
                / max(rollout.timings.get("generate_s", 0.0), 1e-9),
                **{f"faults/{k}": float(v) for k, v in self.fleet.faults.items()}}

    # ------------------------------------------------------------------ checkpoints and the loop
    def save_checkpoint(self) -> Path:
        fleet, tmp = self.fleet, self.checkpoints.begin(self.step)
        fleet.call(fleet.learners, "save_checkpoint", str(tmp / "learner"), stage="checkpoint: learner state")
        fleet.call(fleet.learners, "save_pretrained", str(tmp / "policy"), stage="checkpoint: policy")
        atomic_write_json(tmp / "trainer_state.json", {
            "step": self.step, "weights_version": self.version, "seed": self.cfg.trainer.seed,
            "sampler": self.sampler_state_undrawn if self.pending else self.sampler.state_dict(),
            "num_workers": len(fleet.slots)})
        return self.checkpoints.commit(self.step, tmp)

    def run(self) -> list[dict[str, float]]:
        t, history, stop = self.cfg.trainer, [], []

        def on_signal(signum, _frame):  # Ctrl-C / SIGTERM: finish the step, checkpoint; a second one abandons
            if stop:
                raise KeyboardInterrupt
            stop.append(signal.Signals(signum).name)
            log.warning("%s: finishing step %d, then a checkpoint (again to abandon it)", stop[0], self.step + 1)

        main = threading.current_thread() is threading.main_thread()
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
        try:
            if self.step >= t.total_steps:
                log.warning("the run in %s already finished step %d (trainer.total_steps=%d); to go on, resume "
                            "with trainer.total_steps=N", self.out, self.step, t.total_steps)
                return history
            while self.step < t.total_steps and not stop:
                n = take_scale_request(self.out)  # `vlgrpo scale` between steps
                if n is not None and n != len(self.fleet.slots):
                    if self.pending:  # collect in-flight generation before workers change
                        self.fleet.collect(self.pending, "finish in-flight generation", self.version)
                    self.fleet.scale(n, self.version)
                try:
                    metrics = self.train_step()
                except StageError as e:
                    self.recover_learners(e)
                    history = [h for h in history if h["step"] <= self.step]  # the later steps run again
                    continue
                if self.val_set and (self.step % t.val_every == 0 or self.step == t.total_steps):
                    metrics.update(self.validate())
                self.metrics.log(self.step, metrics)
                history.append(metrics)
                if t.checkpoint_every and self.step % t.checkpoint_every == 0 and self.step < t.total_steps \
                        and not stop:
                    self.save_checkpoint()
            if self.pending:
                self.fleet.collect(self.pending, "finish in-flight generation", self.version)
            self.save_checkpoint()
            if stop:
                log.warning("stopped by %s after step %d, checkpoint saved; continue with: vlgrpo train --resume %s",
                            stop[0], self.step, self.out)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.metrics.close()
        return history

    def shutdown(self) -> None:
        if self.fleet is not None:
            self.fleet.shutdown()


def train(cfg: Config, resume: Optional[str] = None) -> list[dict[str, float]]:
    """Run a whole training job; returns the per-step metrics."""
    trainer = Trainer(cfg, resume=resume)
    try:
        trainer.setup()
        return trainer.run()
    finally:
        trainer.shutdown()
