"""Injected faults: dead rollout worker, NaN loss, bad data rows, over-long prompts, a raising user
reward, bad configs, a killed run resumed. Each survives with nothing silently lost."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch

from vlgrpo.cluster.config import ConfigError, load_config
from vlgrpo.cluster.controller import Trainer
from vlgrpo.rollout.hf_engine import tensor_checksum
from vlgrpo.rollout.synthetic import make_dataset

from ..conftest import policy_weights, process_threads, small_run_config

PROMPTS, G = 4, 4


def _cfg(out, *extra):
    return small_run_config(out, "trainer.timeout_s=120", *extra, prompts=PROMPTS, group_size=G)


class KillWorkerMidGeneration(Trainer):
    """SIGKILLs the processes of the first ``kill`` rollout workers right after step 1's prompts were sent."""

    kill, killed_pids = 1, None

    def launch(self, step):
        if step != 1 or self.killed_pids is not None:
            return super().launch(step)
        pids = [h["pid"] for h in ray.get([w.health.remote() for w in self.fleet.workers[:self.kill]])]
        chunks = super().launch(step)
        time.sleep(0.05)  # the chunks are in flight (32 tokens take longer than this)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        self.killed_pids = pids
        return chunks


@pytest.mark.slow
@pytest.mark.parametrize("kill", [1, 2])
def test_rollout_worker_death(tmp_path, ray_session, fault_log, kill):
    """kill=2: the driver finds one dead chunk first; re-forming the sync group then finds the other worker
    dead too (as when a node is lost) and replaces it before allotting threads or syncing."""
    trainer = KillWorkerMidGeneration(_cfg(tmp_path / "kill", "trainer.total_steps=3", "rollout.max_tokens=32"))
    trainer.kill = kill
    try:
        trainer.setup()
        history = trainer.run()
        learner = {n: tensor_checksum(t) for n, t in policy_weights(trainer).items()}
        workers = ray.get([w.weights_checksum.remote(list(learner)) for w in trainer.fleet.workers])
        pids = {h["pid"] for h in ray.get([w.health.remote() for w in trainer.fleet.workers])}
        threads, allotted = process_threads(trainer), trainer.fleet.threads
    finally:
        trainer.shutdown()
    assert threads == allotted, "a replacement worker did not get its share of the cores"
    assert len(trainer.killed_pids) == kill and not pids & set(trainer.killed_pids)
    assert len(pids) == 2  # replaced, not just dropped
    assert [h["step"] for h in history] == [1, 2, 3]
    assert history[1]["faults/worker_replaced"] >= kill and history[1]["faults/prompts_retried"] >= 1
    rows = [int(h["learner/num_seqs"]) for h in history]
    lost = sum(PROMPTS * G - r for r in rows)
    assert lost == 0, rows
    assert all(w == learner for w in workers), "a replacement worker does not hold the learner's weights"
    fault_log(f"{kill} rollout worker(s) SIGKILLed mid-generation", survived=True, data_lost=lost)


class KillLearnerInUpdate(Trainer):
    """SIGKILLs learner rank 0's process as step 4's update starts (the last checkpoint is step 2's)."""

    killed_pid = None

    def update(self, batch):
        if self.step == 3 and self.killed_pid is None:
            self.killed_pid = ray.get(self.fleet.learners[0].ping.remote())["pid"]
            os.kill(self.killed_pid, signal.SIGKILL)
        return super().update(batch)


@pytest.mark.slow
def test_dead_learner_restarts_from_the_last_checkpoint(tmp_path, ray_session, fault_log):
    """trainer.max_restarts: the driver restarts the learner group from step 2's checkpoint and goes on;
    steps 3-5 then equal an uninterrupted run's (same seeds, data order and optimizer state)."""
    runs = {}
    for name, cls in (("killed", KillLearnerInUpdate), ("clean", Trainer)):
        trainer = cls(_cfg(tmp_path / name, "trainer.total_steps=5", "trainer.checkpoint_every=2",
                           "trainer.max_restarts=1"))
        try:
            trainer.setup()
            runs[name] = (trainer.run(), _metrics(tmp_path / name), policy_weights(trainer), process_threads(trainer))
        finally:
            trainer.shutdown()
    (history, logged, weights, threads), (clean, _, clean_weights, clean_threads) = runs["killed"], runs["clean"]
    assert threads == clean_threads, "the restarted learner did not get its share of the cores"
    assert [h["step"] for h in history] == [m["step"] for m in logged] == [1, 2, 3, 4, 5]
    assert history[-1]["faults/learner_restarts"] == 1 and history[-1]["faults/recovery_s"] > 0
    assert "faults/learner_restarts" not in clean[-1]
    for a, b in zip(history, clean):
        for key in ("reward/mean", "loss/total", "response_length/mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert weights.keys() == clean_weights.keys()
    assert all(torch.allclose(weights[k], clean_weights[k], atol=1e-6) for k in weights)
    fault_log(f"learner rank 0 SIGKILLed in an update (restart {history[-1]['faults/recovery_s']:.1f} s)",
              survived=True)


class NaNAdvantages(Trainer):
    def advantages(self, rollout):
        batch, extra = super().advantages(rollout)
        if self.step == 1:
            batch.advantages = torch.full_like(batch.advantages, float("nan"))
        return batch, extra


@pytest.mark.slow
def test_nan_loss_is_skipped(tmp_path, ray_session, fault_log):
    trainer = NaNAdvantages(_cfg(tmp_path / "nan", "trainer.total_steps=3", "rollout.num_workers=1"))
    try:
        trainer.setup()
        history = trainer.run()
        weights = policy_weights(trainer)
    finally:
        trainer.shutdown()
    assert history[1]["faults/nonfinite_micro_batches"] >= 1
    assert history[0]["faults/nonfinite_micro_batches"] == 0 and history[2]["faults/nonfinite_micro_batches"] == 0
    assert all(torch.isfinite(t).all() for t in weights.values()), "a NaN reached the weights"
    assert all(h["loss/total"] == h["loss/total"] for h in (history[0], history[2]))  # finite steps around it
    fault_log("NaN loss (step skipped)", survived=True)


def _bad_data(root: Path) -> Path:
    path = make_dataset("color", 6, root, seed=3)
    rows = path.read_text().splitlines()
    good = json.loads(rows[0])
    (root / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    extra = [
        {**good, "id": "missing", "image": "images/nope.png"},
        {**good, "id": "corrupt", "image": "images/corrupt.png"},
        {**good, "id": "no-answer", "conversations": good["conversations"][:1]},
        {**good, "id": "too-long", "conversations": [
            {"from": "human", "value": "<image>" + " colour" * 5000}, good["conversations"][1]]},
    ]
    path.write_text("\n".join(rows + [json.dumps(r) for r in extra] + ["{not json"]) + "\n")
    return path


@pytest.mark.slow
def test_bad_rows_long_prompts_and_raising_reward(tmp_path, ray_session, fault_log):
    data = _bad_data(tmp_path / "data")
    cfg = _cfg(tmp_path / "bad", "trainer.total_steps=2", "trainer.prompts_per_step=7", "rollout.num_workers=1",
               f"data.sources=[{{path: {data}}}]",
               "rollout.rewards=[{name: accuracy}, {name: vlgrpo.tests.plugins:flaky_reward, weight: 0.5}]")
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        history = trainer.run()
    finally:
        trainer.shutdown()
    assert trainer.dataset.skipped == {"missing_image": 1, "unreadable_image": 1, "no_answer": 1, "invalid_json": 1}
    assert history[-1]["data/skipped"] == 4
    # the over-long prompt was drawn (7 of 7 usable rows per step), skipped and counted, not generated
    assert history[0]["faults/prompts_prompt_too_long"] >= 1
    assert history[0]["learner/num_seqs"] == 6 * G
    assert history[0]["reward/errors"] > 0  # the raising reward was caught per sample and counted
    fault_log("bad rows (missing, corrupt, no answer, bad JSON)", survived=True)
    fault_log("prompt longer than the model's context", survived=True)
    fault_log("user reward function raising", survived=True)


@pytest.mark.parametrize("override, field", [
    ("rollout.num_workers=two", "rollout.num_workers"),
    ("learner.lr=fast", "learner.lr"),
    ("model.module=llava-next", "model.module"),
    ("trainer.mode=sometimes", "trainer.mode"),
    ("rollout.rewards=[{name: nope}]", "rollout.rewards"),
    ("rollout.temprature=0.7", "rollout.temprature"),
])
def test_config_errors_name_the_field(override, field, fault_log):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert field in str(e.value)  # (load_config starts nothing: see also tests/cluster/test_cli.py)
    fault_log(f"bad config: {override}", survived=True)


def test_unknown_module_key_lists_known_keys():
    with pytest.raises(ConfigError, match="qwen.*internvl|internvl.*qwen"):
        load_config(None, ["model.module=llava-next"])


def _metrics(out: Path) -> list[dict]:
    p = out / "metrics.jsonl"
    if not p.exists():
        return []
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip().endswith("}")]


@pytest.mark.slow
def test_killed_run_resumes_from_last_checkpoint(tmp_path, fault_log):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "vlgrpo.cluster.cli", "train", f"trainer.output_dir={out}",
            "trainer.total_steps=4", "trainer.checkpoint_every=2", "trainer.prompts_per_step=4",
            "rollout.group_size=4", "rollout.max_tokens=6", "rollout.num_workers=1", "learner.zero_stage=0",
            "learner.lr=0.005", "metrics.tensorboard=false"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    try:
        while time.time() < deadline and len(_metrics(out)) < 3:
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray, mid-run
        proc.wait()
    killed = _metrics(out)
    assert len(killed) >= 3
    ckpt = out / "checkpoints" / "step_000002"
    assert (ckpt / "trainer_state.json").exists() and (ckpt / "policy" / "model.safetensors").exists()

    done = subprocess.run(args + ["--resume", str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = _metrics(out)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]  # steps after the checkpoint were re-run once
    # same seed, same data order, same optimizer state: step 3 again equals step 3 before the kill
    for key in ("reward/mean", "loss/total", "response_length/mean"):
        assert resumed[2][key] == pytest.approx(killed[2][key], rel=1e-4, abs=1e-6), key
    from transformers import AutoConfig

    AutoConfig.from_pretrained(out / "checkpoints" / "step_000004" / "policy")
    fault_log("whole run SIGKILLed, then --resume", survived=True)


@pytest.mark.slow
def test_ctrl_c_finishes_the_step_checkpoints_and_says_how_to_resume(tmp_path, fault_log):
    """SIGINT to the whole process group (what Ctrl-C in a terminal sends: the driver and its local
    Ray alike) mid-run: the step in flight finishes, a checkpoint of it is written, the last line
    names the resume command, exit 0; resuming then runs exactly the remaining steps."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "vlgrpo.cluster.cli", "train", f"trainer.output_dir={out}", "trainer.total_steps=40",
            "trainer.checkpoint_every=0", "trainer.prompts_per_step=4", "rollout.group_size=4", "rollout.max_tokens=6",
            "rollout.num_workers=1", "learner.zero_stage=0", "metrics.tensorboard=false"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and len(_metrics(out)) < 2:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0 and "Traceback" not in output, output[-3000:]
    done = len(_metrics(out))
    assert 2 <= done < 40 and f"continue with: vlgrpo train --resume {out}" in output
    assert (out / "checkpoints" / f"step_{done:06d}" / "trainer_state.json").exists()
    resumed = subprocess.run(args[:4] + ["--resume", str(out), "trainer.total_steps=" + str(done + 2)],
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [m["step"] for m in _metrics(out)] == list(range(1, done + 3))
    fault_log("Ctrl-C (SIGINT to the process group) mid-run", survived=True)
