"""Run the real vlgrpo controller (``Trainer``) for a few steps with per-phase timing.

The learner and rollout actors are the package's own classes with timers added by subclassing
(benchmark-only; nothing in the package changes): the learner times the model's forward calls,
``Tensor.backward`` and the optimizer step (``register_step_pre/post_hook``); the rollout worker
records its own generate / reward seconds per call.
"""
from __future__ import annotations

import functools
import tempfile
import time
from collections import defaultdict
from typing import Any, Optional

import torch

from vlgrpo.cluster.actors import SyncedLearner, SyncedWorker
from vlgrpo.cluster.fleet import Fleet

from ._common import mean


class ProfiledLearner(SyncedLearner):
    """``SyncedLearner`` whose ``train_step`` metrics also carry ``prof/forward_s``,
    ``prof/backward_s`` and ``prof/optimizer_s`` (sums over the step)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._prof: dict[str, float] = defaultdict(float)
        prof = self._prof
        model = self.model
        orig_forward = model.forward

        @functools.wraps(orig_forward)  # keeps the signature (logits_to_keep is looked up in it)
        def forward(*a, **k):
            t0 = time.perf_counter()
            try:
                return orig_forward(*a, **k)
            finally:
                prof["forward_s"] += time.perf_counter() - t0

        model.forward = forward
        orig_backward = torch.Tensor.backward

        def backward(self_t, *a, **k):  # this actor process only
            t0 = time.perf_counter()
            try:
                return orig_backward(self_t, *a, **k)
            finally:
                prof["backward_s"] += time.perf_counter() - t0

        torch.Tensor.backward = backward
        opt = self.optimizer
        inner = getattr(opt, "optimizer", opt)  # a DeepSpeed wrapper holds the torch optimizer
        if hasattr(inner, "register_step_pre_hook"):
            inner.register_step_pre_hook(lambda *a: prof.__setitem__("_opt_t0", time.perf_counter()))
            inner.register_step_post_hook(
                lambda *a: prof.__setitem__("optimizer_s", prof["optimizer_s"] + time.perf_counter() - prof["_opt_t0"]))

    def train_step(self, batch) -> dict[str, float]:
        self._prof.clear()
        m = super().train_step(batch)
        m.update({f"prof/{k}": v for k, v in self._prof.items() if not k.startswith("_")})
        return m


class ProfiledWorker(SyncedWorker):
    """``RolloutWorker`` that keeps the timings of every ``generate`` call."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._log: list[dict[str, float]] = []

    def generate(self, samples, sampling):
        batch = super().generate(samples, sampling)
        self._log.append(dict(batch.timings))
        return batch

    def prof_log(self) -> list[dict[str, float]]:
        out, self._log = self._log, []
        return out


def use_profiled_actors() -> None:
    """Make the controller's fleet start the profiled subclasses."""
    Fleet.learner_class, Fleet.worker_class = ProfiledLearner, ProfiledWorker


def run_vlgrpo(overrides: list[str], steps: int, warmup: int = 1, workdir: Optional[str] = None) -> dict[str, Any]:
    """Set up a ``Trainer`` with ``overrides``, run ``warmup + steps`` steps, and return the mean
    per-phase seconds of the last ``steps`` steps (plus ``step_s``, the wall time per step)."""
    from vlgrpo.cluster.config import load_config
    from vlgrpo.cluster.controller import Trainer

    use_profiled_actors()
    tmp = tempfile.TemporaryDirectory(prefix="vlgrpo-bench-run-")
    out = workdir or tmp.name
    cfg = load_config(None, list(overrides) + [
        f"trainer.total_steps={warmup + steps}", "metrics.tensorboard=false", "trainer.checkpoint_every=0",
        "trainer.val_every=0", "metrics.samples_every=0", f"trainer.output_dir={out}"])
    trainer = Trainer(cfg)
    t0 = time.perf_counter()
    try:
        trainer.setup()
        setup_s = time.perf_counter() - t0
        hist = []
        for _ in range(warmup):
            trainer.train_step()
        import ray

        t_run = time.perf_counter()
        for _ in range(steps):
            hist.append(trainer.train_step())
        wall = time.perf_counter() - t_run
        wlog = ray.get(trainer.fleet.workers[0].prof_log.remote())
    finally:
        try:
            trainer.metrics.close()
        except Exception:
            pass
        trainer.shutdown()
        tmp.cleanup()

    def avg(key: str) -> float:
        return mean([h.get(key, 0.0) for h in hist])

    # (asking the worker for its log mid-run would wait behind an in-flight async generation)
    gen_calls = wlog[-steps:] or [{}]  # the generations the measured steps trained on
    res = {
        "setup_s": setup_s,
        "step_s": wall / steps,
        "driver_wait_generation_s": avg("time/generate_s"),
        "driver_learner_call_s": avg("time/update_s"),
        "sync_s": avg("sync/seconds"),
        "worker_generate_s": mean([c.get("generate_s", 0.0) for c in gen_calls]),
        "worker_reward_s": mean([c.get("reward_s", 0.0) for c in gen_calls]),
        "learner_step_s": avg("time/learner_s"),
        "learner_prepare_s": avg("time/learner_prepare_s"),
        "learner_forward_s": avg("prof/forward_s"),
        "learner_backward_s": avg("prof/backward_s"),
        "learner_optimizer_s": avg("prof/optimizer_s"),
        "completion_tokens": avg("response_length/mean") * cfg.trainer.prompts_per_step * cfg.rollout.group_size,
        "staleness": avg("staleness/mean"),
        "reward": avg("reward/mean"),
    }
    res["learner_other_s"] = res["learner_step_s"] - res["learner_prepare_s"] - res["learner_forward_s"] \
        - res["learner_backward_s"] - res["learner_optimizer_s"]
    res["driver_other_s"] = res["step_s"] - res["driver_wait_generation_s"] - res["driver_learner_call_s"] - res["sync_s"]
    return res


PHASES = [
    ("step wall", "step_s"),
    ("  driver waits for generation", "driver_wait_generation_s"),
    ("  driver waits for the learner", "driver_learner_call_s"),
    ("  weight sync", "sync_s"),
    ("  driver other (advantages, batching)", "driver_other_s"),
    ("rollout worker: generate", "worker_generate_s"),
    ("rollout worker: rewards", "worker_reward_s"),
    ("learner: train_step", "learner_step_s"),
    ("  learner: processor inputs", "learner_prepare_s"),
    ("  learner: forward", "learner_forward_s"),
    ("  learner: backward", "learner_backward_s"),
    ("  learner: optimizer", "learner_optimizer_s"),
    ("  learner: other (log-probs, loss, clip)", "learner_other_s"),
]
