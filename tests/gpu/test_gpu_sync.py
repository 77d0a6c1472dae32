"""GPU weight sync, as the fleet runs it on a GPU cluster: CUDA IPC to a receiver on the source's GPU
(``rollout.colocate``) and the NCCL broadcast to a receiver on another GPU, each with checksums and
exact tensors, and an NCCL group that fails (not hangs) when its receiver is gone. Skipped without
CUDA (the NCCL cases without two GPUs). Run them all with ``.ci/gpu_check.sh``."""
from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch

from vlgrpo.cluster.placement import get_free_port
from vlgrpo.cluster.weight_sync import (
    SyncGroup, SyncGroupInfo, SyncReport, WeightSyncError, check_checksums, make_plan, receive_weights, send_weights,
    spec_of,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"embed.weight": torch.randn(512, 256, generator=g).to(torch.bfloat16),  # bf16 and fp32 buckets
            "layer.weight": torch.randn(256, 256, generator=g).to(torch.bfloat16),
            "norm.weight": torch.randn(256, generator=g)}


def _receiver(info: SyncGroupInfo, device: int, plan, queue) -> None:
    torch.cuda.set_device(device)
    group = SyncGroup(info, 1)
    checksums: list[str] = []
    got = {n: t.cpu().clone() for n, t in receive_weights(group, plan, checksums)}
    expected = _tensors()
    queue.put((checksums, {n: torch.equal(t, expected[n]) for n, t in got.items()}))
    group.close()


@pytest.mark.parametrize("transport", ["ipc", "nccl"])
def test_cuda_sync_delivers_exact_tensors_with_checksums(transport):
    if transport == "nccl" and torch.cuda.device_count() < 2:
        pytest.skip("the NCCL broadcast needs two GPUs (NCCL refuses two ranks on one)")
    torch.cuda.set_device(0)
    src = {n: t.cuda() for n, t in _tensors().items()}
    plan = make_plan([spec_of(n, t) for n, t in src.items()], version=1, bucket_mb=0.25, verify=True)
    info = SyncGroupInfo("127.0.0.1", get_free_port(), world_size=2, backend="nccl", timeout_s=120,
                         ipc_ranks=(1,) if transport == "ipc" else ())
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_receiver, args=(info, 0 if transport == "ipc" else 1, plan, queue))
    proc.start()
    group = SyncGroup(info, 0)
    sent = send_weights(group, plan, iter(src.items()))
    checksums, same = queue.get(timeout=300)
    proc.join(timeout=60)
    assert list(same) == plan.names and all(same.values()), same
    check_checksums(sent, [SyncReport(1, len(same), checksums, member=transport)])
    assert not group.kept  # IPC buckets released after the end-of-sync barrier
    group.close()


def _dead_receiver(info: SyncGroupInfo) -> None:
    torch.cuda.set_device(1)
    SyncGroup(info, 1)  # joins, then its process ends: the broadcast has nobody to receive it


def test_nccl_broadcast_to_a_dead_receiver_raises_within_the_timeout():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    torch.cuda.set_device(0)
    info = SyncGroupInfo("127.0.0.1", get_free_port(), world_size=2, backend="nccl", timeout_s=20)
    proc = mp.get_context("spawn").Process(target=_dead_receiver, args=(info,))
    proc.start()
    group = SyncGroup(info, 0)
    proc.join(timeout=120)
    t0 = time.monotonic()
    with pytest.raises(WeightSyncError, match="did not finish"):
        group.broadcast(torch.ones(1 << 20, device="cuda"))
        torch.cuda.synchronize()
    assert time.monotonic() - t0 < 60  # our poll (20 s), long before NCCL's watchdog would kill this process
