"""Learner -> rollout weight sync: the transport (``broadcast``, ``shm``, ``ipc``), its group, and vLLM worker
processes as members; versioned buckets, checksummed with ``verify``. Design: docs/design.md#weight-sync."""
from __future__ import annotations

import hashlib
import itertools
import math
import os
import pickle
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Iterable, Iterator, Optional, Sequence

import torch
from torch.distributed import PrefixStore, TCPStore
from torch.multiprocessing.reductions import reduce_tensor


class WeightSyncError(RuntimeError):
    pass


@dataclass
class SyncConfig:
    """The ``sync`` section of the run config."""

    bucket_mb: float = 16.0  # benchmarks/weight_sync: 16 MB beat 1, 64 and 256 MB over gloo on CPU
    verify: bool = True  # compare checksums of every bucket on both sides; fail loudly on mismatch
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | gloo | nccl
    # auto: workers on the learner's node read its weights from shared memory (CPU / gloo), the
    # others get the broadcast | shm: like auto, but fail if a worker cannot | broadcast: never shm
    transport: str = "auto"
    timeout_s: float = 300.0


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # e.g. "float32"
    offset: int = -1  # byte offset in the source's shared region (-1: packed by the plan)
    live: bool = False  # the source's tensor itself lives at ``offset`` (nothing to stage or wait for)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def nbytes(self) -> int:
        return self.numel * self.torch_dtype.itemsize


@dataclass
class SyncPlan:
    version: int
    buckets: list[list[TensorSpec]]
    verify: bool = False

    @property
    def names(self) -> list[str]:
        return [s.name for b in self.buckets for s in b]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for b in self.buckets for s in b)


def make_plan(specs: Sequence[TensorSpec], version: int, bucket_mb: float, verify: bool = False) -> SyncPlan:
    """Consecutive tensors of one dtype in buckets of at most ``bucket_mb`` (a larger tensor: a bucket of its own),
    in order: the sender must yield in it."""
    limit, buckets, cur, cur_bytes = max(1, int(bucket_mb * 2**20)), [], [], 0
    for s in specs:
        if cur and (s.dtype != cur[0].dtype or cur_bytes + s.nbytes > limit):
            buckets.append(cur)
            cur, cur_bytes = [], 0
        cur.append(s)
        cur_bytes += s.nbytes
    if cur:
        buckets.append(cur)
    return SyncPlan(version=version, buckets=buckets, verify=verify)


ALIGN = 64  # bytes: every tensor placed in a shared region starts on a cache line


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def region_offsets(plan: SyncPlan) -> list[list[int]]:
    """Byte offset of every tensor of ``plan`` in the shared region: the specs' own offsets (a
    source that keeps its weights in the region), or, when no spec has one, packed in plan order."""
    specs = [s for b in plan.buckets for s in b]
    if len({s.offset >= 0 for s in specs}) > 1:
        raise WeightSyncError(f"weight sync v{plan.version}: some tensors have a shared-memory offset and some not")
    packed = iter([0, *itertools.accumulate(aligned(s.nbytes) for s in specs)])
    return [[s.offset if s.offset >= 0 else next(packed) for s in b] for b in plan.buckets]


def packed_bytes(specs: Sequence[TensorSpec]) -> int:
    """Size of a region holding ``specs`` packed (a source without placed weights)."""
    return sum(aligned(s.nbytes) for s in specs)


def spec_of(name: str, t: torch.Tensor, offset: int = -1, live: bool = False) -> TensorSpec:
    return TensorSpec(name, tuple(t.shape), str(t.dtype).removeprefix("torch."), offset, live)


_BLOCK = 8192  # bytes summed together by ``buffer_checksum``


def buffer_checksum(*bufs: torch.Tensor) -> str:
    """Digest of ``bufs`` (a bucket's tensors, in order) at about memory speed, on their device: blake2b of
    each buffer's int64 word sums per 8 KB block (wrap-around: exact and order-independent, so every process
    agrees), ragged tail and length. Any changed, shifted or stale block changes it; it guards against
    transport and offset bugs, not against an adversary."""
    h = hashlib.blake2b(digest_size=16)
    for buf in bufs:
        b = buf.detach().contiguous().reshape(-1).view(torch.uint8)
        n = b.numel()
        main = n - n % _BLOCK
        if main:
            head = b[:main]
            if head.data_ptr() % 8:  # an int64 view needs 8-byte alignment
                head = head.clone()
            h.update(head.view(torch.int64).view(-1, _BLOCK // 8).sum(1).cpu().numpy())
        if main < n:
            h.update(b[main:].cpu().numpy())
        h.update(n.to_bytes(8, "little"))
    return h.hexdigest()


class SharedRegion:
    """``nbytes`` of anonymous shared memory (``memfd``) owned by this process, with a bump allocator. Other
    processes of the same user on this node map it with :meth:`attach` through ``/proc/<pid>/fd/<fd>``; the
    kernel frees it when the last mapping and descriptor are gone (a crash leaves nothing behind)."""

    def __init__(self, nbytes: int, name: str = "vlgrpo-weights") -> None:
        nbytes = max(ALIGN, aligned(int(nbytes)))
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.posix_fallocate(self.fd, 0, nbytes)  # reserve now: no SIGBUS in the middle of a sync
        except OSError as e:
            os.close(self.fd)
            raise WeightSyncError(f"cannot reserve {nbytes / 2**20:.0f} MB of shared memory for weight sync ({e}); "
                                  "free memory or set sync.transport=broadcast") from e
        self.nbytes, self.handle = nbytes, (os.getpid(), self.fd, nbytes)  # handle: what a receiver needs to map it
        self.tensor = torch.from_file(f"/proc/self/fd/{self.fd}", shared=True, size=nbytes, dtype=torch.uint8)
        self.base = self.tensor.data_ptr()
        self.used = 0

    @staticmethod
    def attach(handle: Sequence[int]) -> torch.Tensor:
        pid, fd, nbytes = (int(x) for x in handle)
        path = f"/proc/{pid}/fd/{fd}"
        try:
            return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        except (RuntimeError, OSError) as e:
            raise WeightSyncError(f"cannot map the learner's shared weights ({path}: {e}); the receiver must run "
                                  "on the learner's node as the same user, or set sync.transport=broadcast") from e

    def alloc(self, nbytes: int) -> int:
        off = self.used
        if off + nbytes > self.nbytes:
            raise WeightSyncError(f"shared region full: {off} + {nbytes} > {self.nbytes} bytes")
        self.used = off + aligned(nbytes)
        return off

    def view(self, offset: int, dtype: torch.dtype, numel: int) -> torch.Tensor:
        return _typed_view(self.tensor, offset, dtype, numel)

    def adopt(self, tensor: torch.Tensor) -> int:
        """Move ``tensor``'s data into the region (``tensor.data`` becomes a view of it, so the
        owner keeps updating it in place); returns its byte offset."""
        if not tensor.is_contiguous() or tensor.device.type != "cpu":
            raise WeightSyncError("only contiguous CPU tensors can live in shared memory")
        off = self.alloc(tensor.numel() * tensor.element_size())
        view = self.view(off, tensor.dtype, tensor.numel()).view(tensor.shape)
        view.copy_(tensor.detach())
        tensor.data = view
        return off

    def offset_of(self, t: torch.Tensor) -> int:
        """Byte offset of ``t``'s data in the region, or -1 when it lives elsewhere."""
        if t.device.type != "cpu" or not t.is_contiguous():
            return -1
        off = t.data_ptr() - self.base
        return off if 0 <= off and off + t.numel() * t.element_size() <= self.nbytes else -1

    def close(self) -> None:
        self.tensor = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _typed_view(region: torch.Tensor, offset: int, dtype: torch.dtype, numel: int) -> torch.Tensor:
    nbytes = numel * dtype.itemsize
    if offset < 0 or offset + nbytes > region.numel():
        raise WeightSyncError(f"tensor at byte {offset} (+{nbytes}) is outside the shared region "
                              f"({region.numel()} bytes)")
    return region[offset:offset + nbytes].view(dtype)


@dataclass
class SyncGroupInfo:
    """Everything a member needs to join: sent by the controller to every member."""

    master_addr: str
    master_port: int
    world_size: int
    backend: str = "gloo"
    name: str = "vlgrpo-wsync"
    timeout_s: float = 300.0
    shm_ranks: tuple[int, ...] = ()  # receivers on the source's node that read its shared region
    shm_handle: Optional[tuple[int, int, int]] = None  # SharedRegion.handle of the source
    ipc_ranks: tuple[int, ...] = ()  # receivers on the source's GPU that open its buckets by IPC handle

    def __post_init__(self) -> None:
        self.shm_ranks, self.ipc_ranks = tuple(sorted(self.shm_ranks)), tuple(sorted(self.ipc_ranks))
        if self.shm_ranks and self.ipc_ranks:
            raise ValueError("a sync group has CPU weights (shm_ranks) or GPU weights (ipc_ranks), not both")
        if self.shm_ranks:
            if self.backend != "gloo":
                raise ValueError("shared-memory weight sync needs CPU tensors (sync.backend gloo); "
                                 "use sync.transport=broadcast with NCCL")
            if self.shm_ranks[0] < 1 or self.shm_ranks[-1] >= self.world_size:
                raise ValueError(f"shm_ranks {self.shm_ranks} must be receiver ranks 1..{self.world_size - 1}")
            if self.shm_handle is None:
                raise ValueError("shm_handle (the source's SharedRegion.handle) is needed when some receivers "
                                 "use shared memory")


class SyncGroup:
    """One member of the weight-sync group (rank 0 = the source, which passes its :class:`SharedRegion`, the
    one whose ``handle`` is in ``info``). Up to two process groups on one ``TCPStore``: ``net`` (the source and
    the broadcast receivers: payloads) and ``shm`` (the source and the shared-memory or IPC receivers: "bucket k
    is staged" signals, the end-of-sync barrier); shared-memory members also map the region."""

    def __init__(self, info: SyncGroupInfo, rank: int, region: Optional[SharedRegion] = None) -> None:
        self.info, self.rank = info, rank
        self.timeout = timedelta(seconds=info.timeout_s)
        if info.backend not in ("gloo", "nccl"):
            raise ValueError(f"sync.backend {info.backend!r}: use 'gloo' or 'nccl'")
        self.device = torch.device("cuda", torch.cuda.current_device()) if info.backend == "nccl" else torch.device("cpu")
        shm = [0, *info.shm_ranks, *info.ipc_ranks]  # the source and the receivers that read its memory
        net = [r for r in range(info.world_size) if r not in shm[1:]]
        self.ipc, self.kept = bool(info.ipc_ranks) and rank in shm, []  # kept: buckets shared by IPC this sync
        self.region: Optional[torch.Tensor] = None  # uint8 view of the shared mapping
        if rank == 0 and info.shm_ranks:
            if region is None or tuple(region.handle) != tuple(info.shm_handle):
                raise WeightSyncError("the sync source must pass the SharedRegion whose handle is in the group info")
            self.region = region.tensor
        elif rank in info.shm_ranks:
            self.region = SharedRegion.attach(info.shm_handle)
        self.store = TCPStore(info.master_addr, info.master_port, info.world_size, rank == 0,
                              timeout=self.timeout, wait_for_workers=False)
        self.net_pg = self._process_group("net", net, info.backend) if rank in net and len(net) > 1 else None
        self.shm_pg = self._process_group("shm", shm, "gloo") if rank in shm and len(shm) > 1 else None

    def _process_group(self, suffix: str, members: list[int], backend: str):
        store = PrefixStore(f"{self.info.name}/{suffix}", self.store)
        rank, size = members.index(self.rank), len(members)
        if backend == "nccl":  # its watchdog (which kills the process) fires only after our own timeout
            opts = torch.distributed.ProcessGroupNCCL.Options()
            opts._timeout = self.timeout + timedelta(seconds=60)
            return torch.distributed.ProcessGroupNCCL(store, rank, size, opts)
        # gloo binds to what the hostname resolves to (often 127.0.x.1, unreachable from other nodes): bind to
        # this node's address on the route to the source instead
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.connect((self.info.master_addr, self.info.master_port))
            opts, gloo = torch.distributed.ProcessGroupGloo._Options(), torch.distributed.ProcessGroupGloo
            opts._devices, opts._timeout = [gloo.create_device(hostname=udp.getsockname()[0])], self.timeout
        return gloo(store, rank, size, opts)

    def _wait(self, work, what: str, pg) -> None:
        """Wait for ``work`` up to ``timeout_s`` (polled: NCCL's ``wait(timeout)`` never gives up), then abort ``pg``."""
        deadline = time.monotonic() + self.info.timeout_s
        while not work.is_completed():
            if time.monotonic() > deadline:
                if hasattr(pg, "abort"):
                    pg.abort()
                raise WeightSyncError(f"weight-sync {what} did not finish within {self.info.timeout_s}s (sync.timeout_s): "
                                      "a member died or hangs; the group must be formed again")
            time.sleep(0.0005)
        work.wait()  # raises the collective's own error, if any

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Payload broadcast among the source and the broadcast receivers."""
        if self.net_pg is not None:
            self._wait(self.net_pg.broadcast(tensor, 0), "broadcast", self.net_pg)

    def signal(self, value: int) -> int:
        """Source: announce ``value`` to the shared-memory receivers; receiver: wait for it."""
        t = torch.tensor([value], dtype=torch.int64)
        self._wait(self.shm_pg.broadcast(t, 0), "shared-memory signal", self.shm_pg)
        return int(t.item())

    def share(self, buf: torch.Tensor, k: int) -> None:
        """Source: post bucket ``k``'s IPC handle and signal it (``buf`` is kept until ``done``)."""
        self.kept.append(buf)
        self.store.set(f"{self.info.name}/ipc/{k}", pickle.dumps(reduce_tensor(buf)))
        self.signal(k)

    def staged(self, k: int, version: int) -> None:
        """Receiver: wait for the source's "bucket ``k`` is staged" signal."""
        if (got := self.signal(-1)) != k:
            raise WeightSyncError(f"weight sync v{version}: expected bucket {k}, the source announced {got}; "
                                  "source and receiver disagree on the plan")

    def open(self, k: int, version: int) -> torch.Tensor:
        """Receiver: the source's bucket ``k``, opened from its IPC handle on this process's device."""
        self.staged(k, version)
        rebuild, args = pickle.loads(self.store.get(f"{self.info.name}/ipc/{k}"))
        if args[6:7] and isinstance(args[6], int) and torch.cuda.is_available():  # the CUDA device index, ours
            args = (*args[:6], torch.cuda.current_device(), *args[7:])
        return rebuild(*args)

    def done(self) -> None:
        """End of a sync on the shared-memory side: returns on the source once every receiver has
        loaded the last bucket, so the learner cannot update weights a receiver is still reading."""
        if self.shm_pg is not None:
            self._wait(self.shm_pg.allreduce([torch.zeros(1)]), "shared-memory end-of-sync", self.shm_pg)
        if self.kept:
            self.kept.clear()
            if torch.cuda.is_available():
                torch.cuda.ipc_collect()

    def views(self, bucket: list[TensorSpec], offsets: list[int]) -> list[torch.Tensor]:
        return [_typed_view(self.region, o, s.torch_dtype, s.numel).view(s.shape) for s, o in zip(bucket, offsets)]

    def close(self) -> None:
        self.net_pg = self.shm_pg = self.store = self.region = None  # a receiver unmaps once its last view is gone


@dataclass
class SyncReport:
    """What one member did in one sync (the source's, or a receiver's)."""

    version: int
    num_tensors: int
    checksums: list[str] = field(default_factory=list)  # per bucket, when the plan verifies
    seconds: float = 0.0
    nbytes: int = 0
    copied_bytes: int = 0  # bytes the source copied into shared memory (0: all its weights live there)
    member: str = "source"  # "source" or "rollout worker <id>"


def send_weights(group: SyncGroup, plan: SyncPlan, named: Iterable[tuple[str, torch.Tensor]]) -> SyncReport:
    """Source side: ``named`` must yield the plan's tensors in plan order (extra names are
    skipped, so a full-state iterator can serve a plan of trainable tensors only)."""
    t0 = time.perf_counter()
    it, checksums, copied = iter(named), [], 0
    offsets = region_offsets(plan) if group.region is not None else None
    for k, bucket in enumerate(plan.buckets):
        tensors = []
        for spec in bucket:
            name, tensor = next((n, t) for n, t in it if n == spec.name)
            if tuple(tensor.shape) != spec.shape:
                raise WeightSyncError(f"{name}: shape {tuple(tensor.shape)} != planned {spec.shape}")
            tensors.append(tensor.detach())
        if offsets is not None:  # shared memory: make sure every tensor is at its offset
            parts = group.views(bucket, offsets[k])
            for spec, dst, src in zip(bucket, parts, tensors):
                if dst.data_ptr() == src.data_ptr() and dst.dtype == src.dtype and src.is_contiguous():
                    continue  # lives there
                if spec.live:  # receivers are reading it already: this must not happen silently
                    raise WeightSyncError(f"weight sync v{plan.version}: {spec.name} was announced as living in shared "
                                          "memory but has moved out of it; the receivers read stale bytes")
                dst.copy_(src)  # staged
                copied += dst.numel() * dst.element_size()
            if not all(spec.live for spec in bucket):
                group.signal(k)  # "bucket k is staged" (live buckets are ready before the sync starts)
            buf = torch.cat([p.reshape(-1) for p in parts]) if group.net_pg is not None else None
        else:
            parts = [t.reshape(-1).to(group.device, s.torch_dtype) for s, t in zip(bucket, tensors)]
            buf = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
            if group.ipc:
                group.share(buf, k)
        group.broadcast(buf)  # none without broadcast receivers
        if plan.verify:
            checksums.append(buffer_checksum(*parts))
    group.done()
    return SyncReport(plan.version, len(plan.names), checksums, time.perf_counter() - t0, plan.nbytes, copied)


def receive_weights(group: SyncGroup, plan: SyncPlan, checksums: Optional[list[str]] = None
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """Receiver side: yields ``(name, tensor)`` bucket by bucket as they arrive (an engine loads them holding one
    bucket at a time), appending bucket checksums to ``checksums``. Shared-memory receivers get views of the
    source's region: copy them, do not keep them."""
    offsets = region_offsets(plan) if group.region is not None else None
    for k, bucket in enumerate(plan.buckets):
        if offsets is not None:  # read in place, after "bucket k is staged" unless it lives there
            if not all(spec.live for spec in bucket):
                group.staged(k, plan.version)
            parts = group.views(bucket, offsets[k])
        elif group.ipc:
            parts = [t.view(s.shape) for s, t in zip(bucket, group.open(k, plan.version).split([s.numel for s in bucket]))]
        else:
            buf = torch.empty(sum(s.numel for s in bucket), dtype=bucket[0].torch_dtype, device=group.device)
            group.broadcast(buf)
            parts = [t.view(s.shape) for s, t in zip(bucket, buf.split([s.numel for s in bucket]))]
        if plan.verify and checksums is not None:
            checksums.append(buffer_checksum(*parts))
        for spec, t in zip(bucket, parts):
            yield spec.name, t
    if offsets is not None or group.ipc:
        group.done()  # the engine has loaded everything: the source may go on


def check_checksums(sent: SyncReport, received: Sequence[SyncReport]) -> None:
    """Controller side: every receiver must have seen exactly the sender's buckets."""
    for r in received:
        if r.checksums != sent.checksums:
            bad = next((i for i, (a, b) in enumerate(zip(sent.checksums, r.checksums)) if a != b),
                       min(len(sent.checksums), len(r.checksums)))
            raise WeightSyncError(f"weight sync v{sent.version}: {r.member} received different bytes than sent (first "
                                  f"bad bucket {bad} of {len(sent.checksums)}); its weights are not the learner's")


class WeightSyncExtension:
    """vLLM worker extension (``worker_extension_cls``, installed by the cluster), mixed into every vLLM worker
    so that a multi-process (tensor-parallel) engine's workers join the sync group themselves, one rank each.
    Called through ``llm.collective_rpc("vlgrpo_...")`` with the dataclasses pickled (vLLM's msgpack carries
    bytes). ``self`` is the vLLM worker: ``reload_weights`` is vLLM's in-place reload, ``rank`` its TP rank."""

    def vlgrpo_join_sync_group(self, info: bytes, rank: int) -> tuple[int, str]:
        """Join as ``rank`` + this worker's TP rank (a TP=k engine takes k consecutive ranks); returns that
        rank and NCCL_CUMEM_ENABLE as this process sees it."""
        my_rank = int(rank) + int(getattr(self, "rank", 0) or 0)
        self._vlgrpo_sync_group = SyncGroup(pickle.loads(info), my_rank)
        return my_rank, os.environ.get("NCCL_CUMEM_ENABLE", "unset")

    def vlgrpo_leave_sync_group(self) -> None:
        if getattr(self, "_vlgrpo_sync_group", None) is not None:
            self._vlgrpo_sync_group.close()
        self._vlgrpo_sync_group = None

    def vlgrpo_receive_weights(self, plan: bytes) -> bytes:
        """Take part in one sync of ``plan`` and reload the tensors in place as buckets arrive."""
        group = getattr(self, "_vlgrpo_sync_group", None)
        if group is None:
            raise WeightSyncError("this vLLM worker has not joined the weight-sync group")
        t0, plan, checksums, count = time.perf_counter(), pickle.loads(plan), [], itertools.count()
        weights = (w for w, _ in zip(receive_weights(group, plan, checksums), count))  # count advances per tensor
        self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
        return pickle.dumps(SyncReport(plan.version, next(count), checksums, time.perf_counter() - t0))
