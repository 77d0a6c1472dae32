"""vlgrpo on a real two-node Ray cluster: two network namespaces on this machine (``twonode.py``).

Node A (head, 5 CPUs) and node B (worker, 2 CPUs) talk over a veth link. Two of A's CPUs are held
back by a placement group of ours, so a run with 1 learner + 4 rollout workers fills A's 3 free
CPUs (learner and 2 workers: shared-memory sync) and puts 2 workers on B (broadcast over the link).
Tests, in order, on one module-scoped cluster:
- ``ray job submit`` of a 2-step run from the root namespace to A's job API (token auth on);
- one 90-step ``vlgrpo train`` driver in namespace A with 4 workers and the demo's learning settings;
  as step 80 ends, A's held CPUs are released and every process of node B is SIGKILLed. Its steps
  before the kill are checked by ``test_training_across_two_nodes`` (shm + broadcast, verified syncs,
  bytes over the link, held-out accuracy >= 0.5 at step 80: measured 0.73, later 0.59; chance 0.25), the
  recovery by ``test_node_loss_mid_run`` (B's two workers replaced on A, prompts retried, all steps;
  faults/recovery_s 42.7 s measured, of which ~30 s is Ray noticing the node is gone).
  One run serves both because a run's start-up (actors importing torch) is most of its time here.
Root on Linux only (network namespaces); skipped otherwise.

No ``GLOO_SOCKET_IFNAME``: this machine's hostname resolves to 127.0.0.1 (as Debian/Ubuntu's default
``127.0.1.1 <hostname>`` does), where gloo's default device would bind, so these tests also check
that the sync group binds to each member's address on its route to the source.

Node death detection is shortened on the head (GCS health checks of the raylets every 1 s, 3 s
timeout, dead after 5 failures: about 5 s instead of Ray's default ~30 s).
"""
from __future__ import annotations

import json
import re
import secrets
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from .twonode import RAY, VENV_BIN, TwoNodeCluster, unavailable

pytestmark = pytest.mark.slow

CPUS_A, CPUS_B, HELD_ON_A = 5, 2, 2
WORKERS, PROMPTS, G = 4, 8, 2
HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "3000",
                 "RAY_health_check_failure_threshold": "5"}
RUN_TIMEOUT_S = 900
STEPS, KILL_AFTER = 90, 80
# the node-loss run learns the demo's colour task first (its settings: 16 prompts x 8, format warm-up, validation)
LEARN = ["trainer.prompts_per_step=16", "rollout.group_size=8", "model.tiny_warmup_steps=100", "trainer.val_every=40"]

BASE = ["rollout.engine=transformers", "learner.num_ranks=1", "learner.zero_stage=0", "model.tiny_warmup_steps=0",
        "trainer.val_every=0", "metrics.samples_every=0", "metrics.tensorboard=false", "trainer.checkpoint_every=0",
        "sync.verify=true", f"trainer.prompts_per_step={PROMPTS}", f"rollout.group_size={G}",
        f"rollout.num_workers={WORKERS}", "trainer.timeout_s=120", "sync.timeout_s=60"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = unavailable()
    if reason:
        pytest.skip(f"two-node Ray cluster in network namespaces: {reason}")
    c = TwoNodeCluster(tmp_path_factory.mktemp("twonode"), cpus_a=CPUS_A, cpus_b=CPUS_B,
                       head_env=HEALTH_CHECKS)
    try:
        c.start()
        t0 = time.perf_counter()
        c.hold = c.hold_cpus("A", HELD_ON_A)
        print(f"\n[two-nodes] cluster up in {c.start_s:.1f}s (+{time.perf_counter() - t0:.1f}s to hold "
              f"{HELD_ON_A} CPUs of A); A={c.head.ip} B={c.nodes['B'].ip}")
        yield c
    finally:
        t0 = time.perf_counter()
        c.stop()
        print(f"[two-nodes] cluster stopped in {time.perf_counter() - t0:.1f}s")


def _train(c: TwoNodeCluster, out: Path, *overrides: str) -> subprocess.Popen:
    """``vlgrpo train`` as a Ray driver inside namespace A, connected to the head; output to out/driver.log."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = c.in_ns("A", "env", f"RAY_ADDRESS={c.gcs_address}", VENV_BIN / "vlgrpo", "train",
                  f"trainer.output_dir={out}", *BASE, *overrides)
    with open(out / "driver.log", "w") as log:
        return subprocess.Popen(cmd, env=c.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _rows(out: Path) -> list[dict]:
    f = out / "metrics.jsonl"
    if not f.exists():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def _check_every_step(rows: list[dict], steps: int, rows_per_step: int = PROMPTS * G) -> None:
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), [r["step"] for r in rows]
    for r in rows:
        assert r["sync/version"] == r["step"]
        assert int(r["learner/num_seqs"]) == rows_per_step, f"step {r['step']} lost prompts: {r['learner/num_seqs']}"


# ------------------------------------------------------------------------------------------ tests
def test_ray_job_submit_to_the_two_node_head(cluster, tmp_path):
    """``ray job submit`` from outside the cluster (the root namespace, over the bridge) to A's job API."""
    c, out = cluster, tmp_path / "job"
    job_id = f"vlgrpo-twonode-{secrets.token_hex(4)}"

    def ray_job(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(RAY), "job", args[0], "--address", c.dashboard_url, *args[1:]], env=c.env,
                              capture_output=True, text=True, timeout=120)

    t0 = time.perf_counter()
    submitted = ray_job("submit", "--no-wait", "--submission-id", job_id, "--", "vlgrpo", "train",
                        f"trainer.output_dir={out}", *BASE, "trainer.total_steps=2", "rollout.num_workers=1",
                        "rollout.max_tokens=4")
    assert submitted.returncode == 0, f"ray job submit failed:\n{submitted.stdout}\n{submitted.stderr}"
    deadline, status = time.monotonic() + RUN_TIMEOUT_S, ""
    while time.monotonic() < deadline:
        text = (lambda o: o.stdout + o.stderr)(ray_job("status", job_id))
        status = next((s for w, s in (("succeeded", "SUCCEEDED"), ("failed", "FAILED"), ("was stopped", "STOPPED"))
                       if f"Job '{job_id}' {w}" in text), "")
        if status:
            break
        time.sleep(3)
    logs = ray_job("logs", job_id)
    if not status:
        ray_job("stop", "--no-wait", job_id)
    print(f"[two-nodes] ray job submit: {status or 'TIMEOUT'} after {time.perf_counter() - t0:.1f}s")
    assert status == "SUCCEEDED", f"job {job_id}: {status or 'no end'}; logs:\n{logs.stdout[-6000:]}"
    _check_every_step(_rows(out), 2)
    summary = [json.loads(line) for line in logs.stdout.splitlines() if line.startswith('{"output_dir"')]
    assert summary and summary[-1]["steps"] == 2


@pytest.fixture(scope="module")
def node_loss_run(cluster, tmp_path_factory):
    """One 90-step run (4 workers) in which node B dies: the first 80 steps show training (and learning)
    across the link, the rest the recovery (one run for both: start-up is much of a run's time here).

    Node B's processes are all SIGKILLed as step 80's row appears in metrics.jsonl, i.e. as step 81's
    generation starts; A's held CPUs are released just before, so the replacements fit there."""
    c, out = cluster, tmp_path_factory.mktemp("node_loss")
    t0 = time.perf_counter()
    rx0 = c.rx_bytes("B")
    proc = _train(c, out, f"trainer.total_steps={STEPS}", *LEARN)
    run = {"out": out, "killed_after": None, "rx_before_kill": None, "detected_s": None}
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            rows = _rows(out)
            if run["killed_after"] is None and len(rows) >= KILL_AFTER:
                run["rx_before_kill"] = c.rx_bytes("B") - rx0
                c.hold.release()
                t_kill = time.perf_counter()
                n = c.kill_node("B")
                run["killed_after"] = len(rows)
                print(f"\n[two-nodes] node B killed after step {len(rows)}: {n} processes in "
                      f"{time.perf_counter() - t_kill:.1f}s, {t_kill - t0:.1f}s into the run")
            if run["killed_after"] is not None and run["detected_s"] is None and \
                    any(r.get("faults/worker_replaced") for r in rows):
                run["detected_s"] = time.perf_counter() - t_kill
            time.sleep(0.1)
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        if proc.poll() is None:  # hung past the bound, or this fixture failed: our driver goes
            proc.kill()
            proc.wait()
    run["rc"], run["log"], run["rows"] = proc.returncode, (out / "driver.log").read_text(errors="replace"), _rows(out)
    print(f"[two-nodes] node-loss run: {time.perf_counter() - t0:.1f}s, rc {proc.returncode}; first row with a "
          f"replacement {run['detected_s'] and round(run['detected_s'], 1)}s after the kill")
    return run


def test_training_across_two_nodes(cluster, node_loss_run):
    """Before node B dies: 2 workers on A read learner 0's shared memory, 2 on B get the broadcast over
    the veth; every sync verified; the policy learns to see (greedy held-out accuracy; chance 0.25)."""
    c, run = cluster, node_loss_run
    before = run["rows"][:KILL_AFTER]
    assert run["killed_after"] is not None, f"the run never reached step {KILL_AFTER}:\n{run['log'][-6000:]}"
    _check_every_step(before, KILL_AFTER, 16 * 8)
    val = {r["step"]: r["val/accuracy"] for r in before if "val/accuracy" in r}
    # a blind policy scores ~0.25 on the 64 balanced prompts (sd 0.054): 0.5 is > 4 sd above it. Measured
    # at step 80: 0.73, then 0.59 once the learner's shared-prefix forward changed the float noise
    assert set(val) == {40, 80} and val[80] >= 0.5, val
    assert "placement:" in run["log"]
    # actors really ran on B (Ray prefixes their output with their node's IP when it is not the driver's)
    assert re.search(rf"\(SyncedWorker pid=\d+, ip={re.escape(c.nodes['B'].ip)}\)", run["log"]), run["log"][-4000:]
    for r in before:  # the transports, decided from where the workers landed
        assert r["sync/shm_workers"] == WORKERS - CPUS_B, r
    # every sync was checksummed bucket by bucket on every worker (a mismatch fails the run)
    assert yaml.safe_load((run["out"] / "config.yaml").read_text())["sync"]["verify"] is True
    # at least one copy of every sync's weights crossed the link (the first, full one is larger)
    rx = run["rx_before_kill"]
    assert rx >= sum(r["sync/mb"] for r in before) * 2**20, (rx, [r["sync/mb"] for r in before])


def test_node_loss_mid_run(cluster, node_loss_run):
    """Node B dies during a step's generation: its two workers are replaced on A, their prompts
    generated again, the sync group formed anew (all shared memory now), and the run finishes."""
    c, run = cluster, node_loss_run
    assert run["killed_after"] is not None and run["killed_after"] < STEPS, "node B was not killed mid-run"
    assert run["rc"] == 0, f"vlgrpo train exited {run['rc']} after node B died:\n{run['log'][-6000:]}"
    rows = run["rows"]
    _check_every_step(rows, STEPS, 16 * 8)  # every step, no prompt lost
    after = rows[run["killed_after"]:]
    assert all(r["sync/shm_workers"] == WORKERS for r in after), after  # all on A now, in the new group
    last = rows[-1]
    assert last.get("faults/worker_replaced", 0) >= CPUS_B, last  # both of B's workers
    # B's workers die with their chunk of step 81 in flight (generated again on A) or just after returning it
    # (found dead at the next weight sync). Since generation prefills each prompt once a chunk takes ~0.1 s,
    # shorter than the kill: the second case happened in a run today; tests/faults covers the retry itself.
    assert last.get("faults/prompts_retried", 0) >= 1 or re.search(r"rollout worker\(s\) (died|lost)", run["log"]), last
    assert "faults/recovery_s" in last, f"no faults/recovery_s in the metrics: {sorted(last)}"
    assert last["faults/recovery_s"] > 0, last
    assert c.alive_nodes() == 1
