"""Placement as a pure function of (config, cluster description): described GPU clusters on a CPU."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vlgrpo.cluster.config import ConfigError, load_config
from vlgrpo.cluster.placement import Node, PlacementError, check_sync_devices, plan_layout, thread_shares, transport

ROOT = Path(__file__).resolve().parents[2]


def _cfg(*overrides):
    return load_config(None, ["rollout.engine=transformers", *overrides])


def _gpus_in_use(layout) -> dict:
    """(node, gpu) -> the shares of it the actors take."""
    used: dict = {}
    for a in layout.actors:
        for g in a.gpu_ids:
            used.setdefault((a.node, g), []).append((a.role, a.gpus / max(1, len(a.gpu_ids))))
    return used


def test_two_nodes_of_eight_gpus():
    layout = plan_layout(_cfg("learner.num_ranks=8", "rollout.num_workers=8"), [Node(64, 8)] * 2)
    learners = [a for a in layout.actors if a.role.startswith("learner")]
    workers = [a for a in layout.actors if a.role.startswith("worker")]
    assert layout.backend == "nccl" and layout.engine_processes.startswith("multiprocess")
    assert {a.node for a in learners} == {0} and {a.node for a in workers} == {1}  # PACK fills node 0 first
    assert all(a.transport == "broadcast" and a.gpus == 1 for a in workers)
    used = _gpus_in_use(layout)
    assert len(used) == 16 and all(len(v) == 1 for v in used.values())  # every GPU once: NCCL can sync them all


def test_tensor_parallel_engines_get_whole_multi_gpu_bundles_and_the_mp_executor():
    layout = plan_layout(_cfg("learner.num_ranks=8", "rollout.num_workers=4", "rollout.tensor_parallel_size=2"),
                         [Node(64, 8)] * 2)
    workers = [a for a in layout.actors if a.role.startswith("worker")]
    assert "mp executor, TP 2" in layout.engine_processes
    assert [layout.groups[a.group] for a in workers] == [[{"CPU": 1.0, "GPU": 2.0}]] * 4
    assert [a.gpu_ids for a in workers] == [(0, 1), (2, 3), (4, 5), (6, 7)] and {a.node for a in workers} == {1}
    with pytest.raises(PlacementError, match="cannot place worker-4"):  # a fifth TP-2 engine has no GPUs left
        plan_layout(_cfg("learner.num_ranks=8", "rollout.num_workers=5", "rollout.tensor_parallel_size=2"),
                    [Node(64, 8)] * 2)


def test_colocated_workers_share_the_learner_gpus_and_worker_0_gets_cuda_ipc():
    layout = plan_layout(_cfg("learner.num_ranks=4", "rollout.num_workers=4", "rollout.colocate=true"), [Node(32, 4)])
    assert layout.colocated and list(layout.groups) == ["learners"]
    assert layout.groups["learners"] == [{"CPU": 2.0, "GPU": 1.0}] * 4  # one bundle per GPU: rank i and worker i
    for i in range(4):
        rank, worker = layout.of(f"learner {i}"), layout.of(f"worker {i}")
        assert (worker.group, worker.bundle, worker.gpu_ids) == ("learners", i, rank.gpu_ids)
        assert rank.gpus + worker.gpus == 1.0
    # worker 0 shares learner 0's GPU, where NCCL cannot reach it: CUDA IPC; the others get the broadcast
    assert [layout.of(f"worker {i}").transport for i in range(4)] == ["ipc", "broadcast", "broadcast", "broadcast"]


@pytest.mark.parametrize("overrides, match", [
    (["rollout.colocate=true", "rollout.tensor_parallel_size=2"], "tensor_parallel_size=1"),
    (["rollout.colocate=true", "learner.num_ranks=2", "rollout.num_workers=3"], "num_workers <= learner.num_ranks"),
    (["learner.num_ranks=5"], "cannot place learners bundle"),
    (["sync.transport=shm"], "cannot read learner 0's weights from shared memory"),
])
def test_layouts_that_cannot_run_or_sync_are_rejected(overrides, match):
    with pytest.raises(PlacementError, match=match):
        plan_layout(_cfg(*overrides), [Node(16, 4)])


def test_on_cpus_same_node_workers_read_shared_memory_and_others_get_the_broadcast():
    layout = plan_layout(_cfg("rollout.num_workers=3", "rollout.cpus_per_worker=2"), [Node(4, 0), Node(4, 0)])
    assert layout.backend == "gloo" and layout.engine_processes == "in the worker process"
    assert [(a.node, a.transport) for a in layout.actors[1:]] == [(0, "shm"), (1, "broadcast"), (1, "broadcast")]
    forced = plan_layout(_cfg("sync.transport=broadcast"), [Node(8, 0)])
    assert {a.transport for a in forced.actors[1:]} == {"broadcast"}
    with pytest.raises(PlacementError, match="no GPUs"):
        plan_layout(_cfg("sync.backend=nccl"), [Node(8, 0)])


def test_transport_rule_and_nccl_device_check():
    src = ("10.0.0.1", (0,))
    assert transport("auto", "nccl", ("10.0.0.1", (0,)), src) == "ipc"
    assert transport("auto", "nccl", ("10.0.0.1", (1,)), src) == "broadcast"
    assert transport("auto", "gloo", ("10.0.0.1", ()), ("10.0.0.1", ())) == "shm"
    assert transport("broadcast", "gloo", ("10.0.0.1", ()), ("10.0.0.1", ())) == "broadcast"
    assert transport("auto", "gloo", ("10.0.0.2", ()), ("10.0.0.1", ())) == "broadcast"
    check_sync_devices("gloo", [("a", "n", (0,)), ("b", "n", (0,))])  # gloo: no device rule
    check_sync_devices("nccl", [("a", "n", (0,)), ("b", "m", (0,)), ("c", "n", (1,))])
    with pytest.raises(PlacementError, match="b and a would share GPU 0"):
        check_sync_devices("nccl", [("a", "n", (0,)), ("b", "n", (0, 1))])


def test_placement_errors_are_config_errors():
    assert issubclass(PlacementError, ConfigError)  # the CLI prints them as one line, before actors start


def test_plan_command_prints_the_layout_and_one_line_errors():
    run = [sys.executable, "-m", "vlgrpo.cluster.cli", "plan", "--nodes", "2", "--gpus-per-node", "8"]
    ok = subprocess.run(run + ["learner.num_ranks=8", "rollout.num_workers=8"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "weight-sync backend: nccl" in ok.stdout and ok.stdout.count("sync: broadcast") == 8
    # a GPU config whose data, model and vLLM live on the cluster, planned on this CPU machine without them
    gpu = subprocess.run(run[:4] + ["--config", "examples/qwen2_5_vl_3b_gpu.yaml", "--nodes", "1", "--gpus-per-node",
                                    "4"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert gpu.returncode == 0 and gpu.stdout.count("sync: broadcast") == 2, gpu.stderr
    bad = subprocess.run(run + ["learner.num_ranks=17"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("vlgrpo: config error: the cluster")
    assert len(bad.stderr.strip().splitlines()) == 1


def test_thread_shares_give_each_phase_its_node_in_sync_mode_and_split_it_in_async():
    one = [("learner", "a"), ("worker", "a")]
    assert thread_shares("sync", one, {"a": 2}, {}) == [2, 2]  # one phase runs at a time: each gets both cores
    assert thread_shares("async", one, {"a": 2}, {}) == [1, 1]  # both run at once: split
    two = [("learner", "a"), ("learner", "a"), ("worker", "a"), ("worker", "b"), ("worker", "b"), ("worker", "b")]
    assert thread_shares("sync", two, {"a": 16, "b": 8}, {}) == [8, 8, 16, 2, 2, 2]
    assert thread_shares("async", two, {"a": 16, "b": 8}, {}) == [5, 5, 5, 2, 2, 2]
    assert thread_shares("async", [("learner", "a")] + [("worker", "a")] * 3, {"a": 2}, {}) == [1] * 4  # >= 1
    assert thread_shares("sync", one, {"a": 8}, {"worker": 3, "learner": None}) == [8, 3]  # a set value wins
