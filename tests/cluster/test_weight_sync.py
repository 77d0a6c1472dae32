"""Weight sync building blocks: bucket plans, the gloo broadcast between real processes, checksums."""
from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from vlgrpo.cluster.weight_sync import (
    SyncGroup, SyncGroupInfo, WeightSyncError, buffer_checksum, check_checksums, get_free_port,
    make_plan, receive_weights, send_weights, spec_of,
)


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(64, 32, generator=g),
        "a.bias": torch.randn(64, generator=g),
        "b.weight": torch.randn(300, 100, generator=g),  # 117 KiB: larger than a 0.1 MB bucket
        "c.half": torch.randn(10, 10, generator=g).to(torch.bfloat16),
        "d.weight": torch.randn(8, 8, generator=g),
    }


def test_plan_buckets_by_size_and_dtype_in_order():
    t = _tensors()
    plan = make_plan([spec_of(n, x) for n, x in t.items()], version=3, bucket_mb=0.1)
    assert plan.names == list(t)  # order preserved
    for bucket in plan.buckets:
        assert len({s.dtype for s in bucket}) == 1
        assert sum(s.nbytes for s in bucket) <= 0.1 * 2**20 or len(bucket) == 1
    assert [len(b) for b in plan.buckets] == [2, 1, 1, 1]
    assert plan.nbytes == sum(x.numel() * x.element_size() for x in t.values())
    big = make_plan([spec_of(n, x) for n, x in t.items()], version=3, bucket_mb=64)
    assert [len(b) for b in big.buckets] == [3, 1, 1]  # only dtype changes split


def test_checksum_mismatch_fails_loudly():
    sent = ["aa", "bb"]
    check_checksums(sent, {"w0": ["aa", "bb"], "w1": ["aa", "bb"]}, version=1)
    with pytest.raises(WeightSyncError, match="w1 received different bytes"):
        check_checksums(sent, {"w0": ["aa", "bb"], "w1": ["aa", "xx"]}, version=1)
    with pytest.raises(WeightSyncError):
        check_checksums(sent, {"w0": ["aa"]}, version=1)


def _receiver(info: SyncGroupInfo, rank: int, plan, queue) -> None:
    """Receive in a separate process and compare there with an independent copy of the source
    tensors (tensors themselves do not cross the queue: torch would share them by file handle)."""
    group = SyncGroup(info, rank)
    checksums: list[str] = []
    expected = _tensors(1)
    same = {n: (t.dtype == expected[n].dtype and torch.equal(t, expected[n]))
            for n, t in receive_weights(group, plan, checksums)}
    queue.put((rank, same, checksums))


def test_broadcast_between_processes_delivers_exact_tensors():
    t = _tensors(1)
    trainable = [n for n in t if n != "a.bias"]  # a plan may carry a subset: the sender skips extras
    plan = make_plan([spec_of(n, t[n]) for n in trainable], version=7, bucket_mb=0.05, verify=True)
    info = SyncGroupInfo("127.0.0.1", get_free_port(), world_size=3, timeout_s=60)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_receiver, args=(info, r, plan, queue)) for r in (1, 2)]
    for p in procs:
        p.start()
    stats = send_weights(SyncGroup(info, 0), plan, iter(t.items()))
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert stats.version == 7 and stats.num_tensors == len(trainable) and stats.nbytes == plan.nbytes
    for rank, same, checksums in results:
        assert list(same) == trainable
        assert all(same.values()), same
        assert checksums == stats.checksums and len(checksums) == len(plan.buckets)
    check_checksums(stats.checksums, {f"rank {r}": c for r, _, c in results}, 7)


def test_buffer_checksum_sees_single_bit():
    x = torch.zeros(1000)
    y = x.clone()
    y.view(torch.int32)[500] ^= 1
    assert buffer_checksum(x) != buffer_checksum(y)
    assert buffer_checksum(x) == buffer_checksum(x.clone())
