"""`ray job submit` against a real head: the way a cluster user runs vlgrpo.

The slow test starts a private head with ``ray start --head`` (GCS, dashboard/job API bound to
127.0.0.1, its own ports and ``--temp-dir``), with **token authentication on**: a fresh token in a
file, ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` for ``ray start`` and for every ``ray job``
command (the job's driver inherits both from the head, so ``vlgrpo train`` connects with it). It
submits a 2-step tiny run with ``--working-dir`` (a temp dir holding examples/cpu_tiny.yaml) and a
job-level ``runtime_env``, polls ``ray job status`` with a bound, reads the run's metrics.jsonl and
stops the head it started.

``ray stop`` is not used: it stops *every* Ray process on the machine (it matches process names),
which would kill the local clusters of tests running beside this one. The head is stopped by
killing (SIGKILL, as ``ray stop --force``) the processes whose command line names its private temp
dir (GCS, raylet, dashboard, monitors) or its GCS port (the Ray client server), and all their
descendants (workers, agents, the job's driver and actors).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from .twonode import process_tree

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"
JOB_TIMEOUT_S = 540  # the whole job (start actors, build the tiny model, 2 steps, final checkpoint)


# ------------------------------------------------------------------------------------------ examples
def test_cpu_tiny_example_is_the_embedded_default():
    from vlgrpo.cluster.config import load_config

    assert load_config(EXAMPLES / "cpu_tiny.yaml").to_dict() == load_config(None).to_dict()


def test_gpu_example_loads(tmp_path, monkeypatch):
    """The Qwen2.5-VL-3B example is a valid config once its data files and image folders exist (they
    live on the cluster's shared filesystem, so point the sources at stand-ins here) and vLLM is
    installed (as on the GPU cluster's driver)."""
    from vlgrpo.cluster import config
    from vlgrpo.cluster.config import load_config

    monkeypatch.setattr(config, "resolve_engine_name", lambda name: name)
    raw = yaml.safe_load((EXAMPLES / "qwen2_5_vl_3b_gpu.yaml").read_text())
    sources = []
    for i, src in enumerate(raw["data"]["sources"]):
        stand_in = tmp_path / f"source{i}.jsonl"
        stand_in.write_text("")
        sources.append({**src, "path": str(stand_in), "image_folder": str(tmp_path)})
    cfg_file = tmp_path / "gpu.yaml"
    cfg_file.write_text(yaml.safe_dump({**raw, "data": {**raw["data"], "sources": sources}}))
    cfg = load_config(cfg_file)
    assert cfg.model.path == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert cfg.rollout.engine == "vllm" and cfg.rollout.num_workers == 2
    assert cfg.learner.num_ranks == 2 and cfg.learner.zero_stage in (2, 3) and cfg.learner.dtype == "bf16"
    assert [r["name"] for r in cfg.rollout.rewards] == ["accuracy", "format"]
    assert {s.get("accu_reward_method") for s in cfg.data.sources} <= {"iou", "mcq", "default", "math"}


def test_runtime_env_example_is_valid():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((EXAMPLES / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # raises on unknown fields or wrong types
    assert all(isinstance(v, str) for v in env.get("env_vars", {}).values())


# ------------------------------------------------------------------------------------------ the head
@dataclass
class Head:
    address: str  # the job API (dashboard), http://127.0.0.1:PORT
    env: dict  # environment for every `ray` command against this head
    temp_dir: str
    gcs_port: int


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _head_processes(temp_dir: str, gcs_port: int) -> list:
    import psutil

    me = os.getpid()
    spare = {me, *(p.pid for p in psutil.Process(me).parents())}  # never this test or its launchers
    roots = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.info["pid"] in spare:
            continue
        cmd = " ".join(p.info["cmdline"] or [])
        if temp_dir in cmd or ("ray.util.client.server" in cmd and f":{gcs_port} " in cmd + " "):
            roots.append(p)
    return process_tree(roots, spare)


def _stop_head(temp_dir: str, gcs_port: int) -> None:
    """``ray stop --force``, restricted to this head's processes."""
    import psutil

    for _ in range(3):  # a dying raylet may still have spawned a worker: look again
        procs = _head_processes(temp_dir, gcs_port)
        if not procs:
            return
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=15)
    left = _head_processes(temp_dir, gcs_port)
    assert not left, f"processes of the test head survived: {[p.pid for p in left]}"


@pytest.fixture
def ray_head(tmp_path):
    # The private temp dir must be short: Ray puts unix sockets under it (108-character limit).
    temp_dir = tempfile.mkdtemp(prefix="vlgrpo-ray-", dir="/tmp")
    token_file = tmp_path / "ray_auth_token"
    token_file.write_text(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes
    token_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")  # the job finds `vlgrpo` here
    gcs, dash, client, agent, agent_grpc, runtime_env_agent, metrics = _free_ports(7)
    cmd = [str(RAY), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=4",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env_agent}",
           f"--metrics-export-port={metrics}", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    t0 = time.perf_counter()
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, f"ray start failed:\n{started.stdout}\n{started.stderr}"
        print(f"\n[job-submit] ray start --head: {time.perf_counter() - t0:.1f}s")
        yield Head(f"http://127.0.0.1:{dash}", env, temp_dir, gcs)
    finally:
        t0 = time.perf_counter()
        _stop_head(temp_dir, gcs)
        print(f"[job-submit] head stopped: {time.perf_counter() - t0:.1f}s")
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray_job(head: Head, command: str, *args: str, timeout: float = 120,
             env: dict | None = None) -> subprocess.CompletedProcess:
    # --address before the arguments: for `submit`, everything after `--` is the entrypoint
    return subprocess.run([str(RAY), "job", command, "--address", head.address, *args], env=env or head.env,
                          capture_output=True, text=True, timeout=timeout)


def _status(head: Head, job_id: str) -> str:
    """The job's status as `ray job status` prints it: "Job 'ID' succeeded" / "failed" / "was stopped",
    else "Status for job 'ID': RUNNING" (or PENDING)."""
    out = _ray_job(head, "status", job_id)
    text = out.stdout + out.stderr
    for word, status in (("succeeded", "SUCCEEDED"), ("failed", "FAILED"), ("was stopped", "STOPPED")):
        if f"Job '{job_id}' {word}" in text:
            return status
    m = re.search(r"Status for job '[^']+': (?:JobStatus\.)?(\w+)", text)
    return m.group(1) if m else f"UNKNOWN (rc {out.returncode}): {text[-2000:]}"


# ------------------------------------------------------------------------------------------ the job
@pytest.mark.slow
def test_ray_job_submit_tiny_run(tmp_path, ray_head):
    head = ray_head
    work = tmp_path / "job"
    work.mkdir()
    shutil.copy(EXAMPLES / "cpu_tiny.yaml", work / "cfg.yaml")
    out_dir = tmp_path / "run"  # absolute: the job's working directory is a copy under the head's temp dir

    # Without the token the job API refuses: token auth is really on.
    no_token = {k: v for k, v in head.env.items() if k not in ("RAY_AUTH_TOKEN_PATH",)}
    no_token["RAY_AUTH_MODE"] = "disabled"
    refused = _ray_job(head, "list", env=no_token)
    assert refused.returncode != 0 and "authentication token" in (refused.stdout + refused.stderr).lower()

    job_id = f"vlgrpo-test-{secrets.token_hex(4)}"
    t0 = time.perf_counter()
    submitted = _ray_job(
        head, "submit", "--no-wait", "--submission-id", job_id, "--working-dir", str(work),
        "--runtime-env-json", json.dumps({"env_vars": {"VLGRPO_SUBMITTED_BY": "test_job_submit"}}),
        "--", "vlgrpo", "train", "--config", "cfg.yaml",
        f"trainer.output_dir={out_dir}", "trainer.total_steps=2", "trainer.checkpoint_every=0",
        "trainer.prompts_per_step=2", "rollout.group_size=2", "rollout.max_tokens=4",
        "rollout.num_workers=1", "learner.num_ranks=1", "metrics.tensorboard=false",
    )
    assert submitted.returncode == 0, f"ray job submit failed:\n{submitted.stdout}\n{submitted.stderr}"
    print(f"[job-submit] submitted {job_id}: {time.perf_counter() - t0:.1f}s")

    deadline = time.monotonic() + JOB_TIMEOUT_S
    status = "PENDING"
    while time.monotonic() < deadline:
        status = _status(head, job_id)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(3)
    elapsed = time.perf_counter() - t0
    logs = _ray_job(head, "logs", job_id)
    if status not in ("SUCCEEDED", "FAILED", "STOPPED"):
        _ray_job(head, "stop", "--no-wait", job_id)
    print(f"[job-submit] job {status} after {elapsed:.1f}s")
    assert status == "SUCCEEDED", f"job {job_id} ended {status}; logs:\n{logs.stdout[-8000:]}\n{logs.stderr[-2000:]}"

    metrics_file = out_dir / "metrics.jsonl"
    assert metrics_file.exists(), f"no {metrics_file}; logs:\n{logs.stdout[-4000:]}"
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("step", "reward/mean", "sync/version", "time/step_s"):
            assert key in r, f"metrics.jsonl row lacks {key!r}: {sorted(r)}"
        assert r["sync/version"] == r["step"]
    saved = yaml.safe_load((out_dir / "config.yaml").read_text())
    assert saved["trainer"]["output_dir"] == str(out_dir) and saved["rollout"]["num_workers"] == 1
    # the CLI's last line, through `ray job logs`
    summary = [json.loads(line) for line in logs.stdout.splitlines() if line.startswith('{"output_dir"')]
    assert summary and summary[-1]["steps"] == 2 and "reward/accuracy" in summary[-1]
