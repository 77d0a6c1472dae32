"""Weight sync building blocks: bucket plans, the gloo broadcast between real processes, checksums."""
from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from vlgrpo.cluster.weight_sync import (
    SyncGroup, SyncGroupInfo, SyncReport, WeightSyncError, buffer_checksum, check_checksums, make_plan,
    receive_weights, send_weights, spec_of,
)
from vlgrpo.cluster.placement import get_free_port


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
    def got(*per_worker):
        return [SyncReport(1, 2, list(c), member=f"w{i}") for i, c in enumerate(per_worker)]

    sent = SyncReport(1, 2, ["aa", "bb"])
    check_checksums(sent, got(["aa", "bb"], ["aa", "bb"]))
    with pytest.raises(WeightSyncError, match="w1 received different bytes"):
        check_checksums(sent, got(["aa", "bb"], ["aa", "xx"]))
    with pytest.raises(WeightSyncError):
        check_checksums(sent, got(["aa"]))


def _receiver(info: SyncGroupInfo, rank: int, plans, queue, go=None) -> None:
    """Receive every plan in a separate process and compare there with an independent copy of the
    source tensors (tensors themselves do not cross the queue: torch would share them by file handle).
    Plan i carries the tensors of ``_tensors(1 + i)``."""
    if info.ipc_ranks:  # CPU tensors cross by IPC handle only as named shared memory (CUDA ones by CUDA IPC)
        torch.multiprocessing.set_sharing_strategy("file_system")
    group = SyncGroup(info, rank)
    out = []
    for i, plan in enumerate(plans):
        if go is not None:  # as the controller does: a sync is only asked for once the update is done
            go[i].wait(60)
        checksums: list[str] = []
        expected = _tensors(1 + i)
        same = {n: (t.dtype == expected[n].dtype and torch.equal(t, expected[n]))
                for n, t in receive_weights(group, plan, checksums)}
        out.append((same, checksums))
    queue.put((rank, "shm" if group.region is not None else "ipc" if group.ipc else "broadcast", out))
    group.close()


@pytest.mark.parametrize("mode", [pytest.param("broadcast", marks=pytest.mark.slow),
                                  pytest.param("shm", marks=pytest.mark.slow), "mixed", "shm-placed", "ipc"])
def test_sync_between_processes_delivers_exact_tensors(mode):
    """Two syncs in a row (all tensors, then a subset with new values) from this process to two
    receiver processes: over the broadcast, shared memory (the source copying into its region, or
    its tensors living there as a learner's do), or one receiver of each kind; ``ipc``: rank 1 opens
    the source's buckets by IPC handle (the colocated GPU path, here with CPU tensors), rank 2 gets
    the broadcast."""
    from vlgrpo.cluster.weight_sync import SharedRegion, packed_bytes

    first, second = _tensors(1), _tensors(2)
    trainable = [n for n in first if n != "a.bias"]  # a plan may carry a subset: the sender skips extras
    shm_ranks = {"broadcast": (), "shm": (1, 2), "mixed": (2,), "shm-placed": (1, 2), "ipc": ()}[mode]
    region = SharedRegion(packed_bytes([spec_of(n, t) for n, t in first.items()])) if shm_ranks else None
    placed = {n: region.adopt(t) for n, t in first.items()} if mode == "shm-placed" else {}
    specs = [spec_of(n, t, placed.get(n, -1), live=n in placed) for n, t in first.items()]
    plans = [make_plan(specs, version=7, bucket_mb=0.05, verify=True),
             make_plan([s for s in specs if s.name in trainable], version=8, bucket_mb=0.05, verify=True)]
    ipc_ranks = (1,) if mode == "ipc" else ()
    if ipc_ranks:
        torch.multiprocessing.set_sharing_strategy("file_system")
    info = SyncGroupInfo("127.0.0.1", get_free_port(), world_size=3, timeout_s=60, shm_ranks=shm_ranks,
                         shm_handle=region.handle if region else None, ipc_ranks=ipc_ranks)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    go = [ctx.Event() for _ in plans]
    procs = [ctx.Process(target=_receiver, args=(info, r, plans, queue, go)) for r in (1, 2)]
    for p in procs:
        p.start()
    group = SyncGroup(info, 0, region)
    go[0].set()
    stats = [send_weights(group, plans[0], iter(first.items()))]
    if placed:  # an optimizer step: the live tensors change in place, nothing is copied to send them
        for n in trainable:
            first[n].copy_(second[n])
    go[1].set()
    if placed:
        assert all(region.offset_of(first[n]) == placed[n] for n in trainable)
        stats.append(send_weights(group, plans[1], iter(first.items())))
    else:
        stats.append(send_weights(group, plans[1], iter(second.items())))
    results = sorted(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    group.close()
    for plan, st in zip(plans, stats):
        assert st.version == plan.version and st.num_tensors == len(plan.names) and st.nbytes == plan.nbytes
        assert st.copied_bytes == (0 if placed or not shm_ranks else plan.nbytes)
    assert [r[1] for r in results] == ["shm" if r in shm_ranks else "ipc" if r in ipc_ranks else "broadcast" for r in (1, 2)]
    assert not group.kept  # the IPC buckets are released once every receiver has loaded them
    for rank, transport, out in results:
        for plan, st, (same, checksums) in zip(plans, stats, out):
            assert list(same) == plan.names
            assert all(same.values()), (transport, same)
            assert checksums == st.checksums and len(checksums) == len(plan.buckets)
    for i, st in enumerate(stats):
        check_checksums(st, [SyncReport(st.version, 0, out[i][1], member=f"rank {r}") for r, _, out in results])


def test_a_transfer_that_never_finishes_raises_and_aborts_its_group():
    """NCCL's ``work.wait(timeout)`` never gives up: the sync polls the work and, past sync.timeout_s,
    aborts the group and raises (here a work that never completes, as a broadcast to a dead worker)."""
    class Never:
        def is_completed(self):
            return False

    class Group:
        aborted = False

        def abort(self):
            self.aborted = True

    group, pg = SyncGroup.__new__(SyncGroup), Group()
    group.info = SyncGroupInfo("127.0.0.1", 1, world_size=2, timeout_s=0.2)
    with pytest.raises(WeightSyncError, match="did not finish within 0.2s"):
        group._wait(Never(), "broadcast", pg)
    assert pg.aborted


def test_a_receiver_whose_source_never_sends_fails_within_the_timeout():
    info = SyncGroupInfo("127.0.0.1", get_free_port(), world_size=2, timeout_s=20)  # also the receiver's start-up
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    receiver = ctx.Process(target=_waiting_receiver, args=(info, queue))
    receiver.start()
    group = SyncGroup(info, 0)  # joins, never sends
    error, seconds = queue.get(timeout=120)
    receiver.join(timeout=30)
    group.close()
    # gloo's own timeout or our poll's, whichever fires first: an error after about sync.timeout_s, not a hang
    assert error in ("WeightSyncError", "DistBackendError", "RuntimeError") and 15 < seconds < 60, (error, seconds)


def _waiting_receiver(info: SyncGroupInfo, queue) -> None:
    import time

    group = SyncGroup(info, 1)
    t0 = time.monotonic()
    try:
        list(receive_weights(group, make_plan([spec_of("w", torch.zeros(4))], version=1, bucket_mb=1)))
        queue.put(("no error", time.monotonic() - t0))
    except Exception as e:  # noqa: BLE001 - reported to the test
        queue.put((type(e).__name__, time.monotonic() - t0))


def _idle_receiver(info: SyncGroupInfo) -> None:
    SyncGroup(info, 1)


def test_live_tensor_that_moved_fails_loudly():
    """A tensor announced as living in shared memory but found elsewhere at send time: the
    receivers may have read stale bytes, so the sync must fail, not stage it quietly."""
    from vlgrpo.cluster.weight_sync import SharedRegion

    t = {"w": torch.randn(8, 8)}
    region = SharedRegion(8 * 8 * 4)
    plan = make_plan([spec_of("w", t["w"], region.adopt(t["w"]), live=True)], version=1, bucket_mb=1)
    info = SyncGroupInfo("127.0.0.1", get_free_port(), world_size=2, timeout_s=10, shm_ranks=(1,),
                         shm_handle=region.handle)
    proc = mp.get_context("spawn").Process(target=_idle_receiver, args=(info,))
    proc.start()
    group = SyncGroup(info, 0, region)
    proc.join(60)
    t["w"] = t["w"].clone()  # e.g. a re-allocation outside the region
    with pytest.raises(WeightSyncError, match="moved out"):
        send_weights(group, plan, iter(t.items()))
    group.close()


def test_shm_info_is_checked():
    with pytest.raises(ValueError, match="sync.backend gloo"):
        SyncGroupInfo("127.0.0.1", 1, world_size=2, backend="nccl", shm_ranks=(1,), shm_handle=(1, 2, 64))
    with pytest.raises(ValueError, match="receiver ranks"):
        SyncGroupInfo("127.0.0.1", 1, world_size=2, shm_ranks=(2,), shm_handle=(1, 2, 64))
    with pytest.raises(ValueError, match="shm_handle"):
        SyncGroupInfo("127.0.0.1", 1, world_size=2, shm_ranks=[1])
    assert SyncGroupInfo("127.0.0.1", 1, world_size=3, shm_ranks=[2], shm_handle=[1, 2, 64]).shm_ranks == (2,)


def test_shared_region_adopts_tensors_and_is_seen_by_another_mapping():
    from vlgrpo.cluster.weight_sync import SharedRegion

    region = SharedRegion(1000)
    a, b = torch.arange(10.0), torch.ones(3, 4, dtype=torch.bfloat16)
    want_a, want_b = a.clone(), b.clone()
    oa, ob = region.adopt(a), region.adopt(b)
    assert oa == 0 and ob % 64 == 0 and ob >= 40
    assert torch.equal(a, want_a) and torch.equal(b, want_b)
    assert region.offset_of(a) == oa and region.offset_of(b) == ob and region.offset_of(want_a) == -1
    other = SharedRegion.attach(region.handle)  # a second mapping, as a receiver process makes
    a.mul_(2)  # in-place updates of the owner are what the other mapping reads
    assert torch.equal(other[oa:oa + 40].view(torch.float32), want_a * 2)
    with pytest.raises(WeightSyncError, match="full"):
        region.alloc(2000)
    region.close()


def test_plan_offsets_pack_or_follow_the_specs():
    from vlgrpo.cluster.weight_sync import region_offsets

    t = _tensors()
    plan = make_plan([spec_of(n, x) for n, x in t.items()], version=1, bucket_mb=0.1)
    flat = [o for row in region_offsets(plan) for o in row]
    assert flat[0] == 0 and all(o % 64 == 0 for o in flat) and flat == sorted(flat)
    sizes = [s.nbytes for b in plan.buckets for s in b]
    assert all(flat[i + 1] - flat[i] >= sizes[i] for i in range(len(flat) - 1))
    given = make_plan([spec_of(n, x, 640 * (i + 1)) for i, (n, x) in enumerate(t.items())], version=1, bucket_mb=0.1)
    assert [o for row in region_offsets(given) for o in row] == [640 * (i + 1) for i in range(len(t))]
    mixed = make_plan([spec_of("x", t["a.bias"], 0), spec_of("y", t["a.bias"])], version=1, bucket_mb=1)
    with pytest.raises(WeightSyncError, match="some tensors"):
        region_offsets(mixed)


def test_buffer_checksum_sees_moved_blocks_and_tails():
    x = torch.randn(3 * 2048 + 5)  # three 8 KB blocks and a ragged tail
    swapped = torch.cat([x[2048:4096], x[:2048], x[4096:]])
    assert buffer_checksum(x) != buffer_checksum(swapped)
    tail = x.clone()
    tail[-1] += 1
    assert buffer_checksum(x) != buffer_checksum(tail)
    assert buffer_checksum(x[:10], x[10:]) != buffer_checksum(x)  # parts are part of the digest
    odd = torch.randn(4099).to(torch.bfloat16)[1:]  # misaligned start: still computed, equal to a copy
    assert buffer_checksum(odd) == buffer_checksum(odd.clone())


def test_buffer_checksum_sees_single_bit():
    x = torch.zeros(1000)
    y = x.clone()
    y.view(torch.int32)[500] ^= 1
    assert buffer_checksum(x) != buffer_checksum(y)
    assert buffer_checksum(x) == buffer_checksum(x.clone())
