"""Learner -> rollout weight sync over a dedicated ``torch.distributed`` process group.

The group holds learner rank 0 (group rank 0, the source) and every rollout worker (ranks 1..W). It
is built from its own ``TCPStore`` and is independent of the DeepSpeed training group and of any
default process group, so rollout workers never join training collectives. NCCL is used when the
tensors live on GPUs, gloo on CPU.

Weights travel in buckets: tensors of one dtype are flattened into one contiguous buffer of up to
``bucket_mb`` and broadcast together (one collective per bucket, not per tensor). A ``SyncPlan``
with names, shapes and dtypes is computed by the sender and handed to receivers through Ray before
the collective starts, so receivers can allocate buffers and unflatten without any extra message.
Each sync carries a version; with ``verify`` every bucket's checksum is computed on both sides and
compared by the controller (``check_checksums``), which fails loudly on mismatch.
"""
from __future__ import annotations

import hashlib
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Iterable, Iterator, Optional, Sequence

import torch


class WeightSyncError(RuntimeError):
    pass


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # e.g. "float32"

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.torch_dtype).element_size()


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
    """Group consecutive tensors of one dtype into buckets of at most ``bucket_mb`` (a tensor larger
    than a bucket gets a bucket of its own). Order is preserved: the sender must yield in it."""
    limit = max(1, int(bucket_mb * 2**20))
    buckets: list[list[TensorSpec]] = []
    cur: list[TensorSpec] = []
    cur_bytes = 0
    for s in specs:
        if cur and (s.dtype != cur[0].dtype or cur_bytes + s.nbytes > limit):
            buckets.append(cur)
            cur, cur_bytes = [], 0
        cur.append(s)
        cur_bytes += s.nbytes
    if cur:
        buckets.append(cur)
    return SyncPlan(version=version, buckets=buckets, verify=verify)


def spec_of(name: str, t: torch.Tensor) -> TensorSpec:
    return TensorSpec(name, tuple(t.shape), str(t.dtype).removeprefix("torch."))


def buffer_checksum(buf: torch.Tensor) -> str:
    b = buf.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return hashlib.blake2b(b.numpy().tobytes(), digest_size=16).hexdigest()


def get_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def get_node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # outside Ray
        return "127.0.0.1"


@dataclass
class SyncGroupInfo:
    """Everything a member needs to join: sent by the controller to every member."""

    master_addr: str
    master_port: int
    world_size: int
    backend: str = "gloo"
    name: str = "vlgrpo-wsync"
    timeout_s: float = 300.0


class SyncGroup:
    """One member of the weight-sync group (rank 0 = the source)."""

    def __init__(self, info: SyncGroupInfo, rank: int) -> None:
        from torch.distributed import PrefixStore, TCPStore

        self.info, self.rank = info, rank
        timeout = timedelta(seconds=info.timeout_s)
        self.store = TCPStore(info.master_addr, info.master_port, info.world_size, rank == 0,
                              timeout=timeout, wait_for_workers=False)
        prefixed = PrefixStore(info.name, self.store)
        if info.backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
            self.pg = torch.distributed.ProcessGroupNCCL(prefixed, rank, info.world_size)
        elif info.backend == "gloo":
            self.device = torch.device("cpu")
            self.pg = torch.distributed.ProcessGroupGloo(prefixed, rank, info.world_size, timeout)
        else:
            raise ValueError(f"sync.backend {info.backend!r}: use 'gloo' or 'nccl'")

    def broadcast(self, tensor: torch.Tensor) -> None:
        work = self.pg.broadcast(tensor, 0)
        if not work.wait(timedelta(seconds=self.info.timeout_s)):
            raise WeightSyncError(f"weight-sync broadcast timed out after {self.info.timeout_s}s")

    def close(self) -> None:
        self.pg = None
        self.store = None


@dataclass
class SyncStats:
    version: int
    nbytes: int
    seconds: float
    num_tensors: int
    checksums: list[str] = field(default_factory=list)

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / 2**20 / max(self.seconds, 1e-9)


def send_weights(group: SyncGroup, plan: SyncPlan, named: Iterable[tuple[str, torch.Tensor]]) -> SyncStats:
    """Source side: ``named`` must yield the plan's tensors in plan order (extra names are
    skipped, so a full-state iterator can serve a plan of trainable tensors only)."""
    t0 = time.perf_counter()
    it = iter(named)
    checksums = []
    for bucket in plan.buckets:
        parts = []
        for spec in bucket:
            name, tensor = next(it)
            while name != spec.name:
                name, tensor = next(it)
            if tuple(tensor.shape) != spec.shape:
                raise WeightSyncError(f"{name}: shape {tuple(tensor.shape)} != planned {spec.shape}")
            parts.append(tensor.detach().reshape(-1).to(group.device, spec.torch_dtype))
        buf = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
        group.broadcast(buf)
        if plan.verify:
            checksums.append(buffer_checksum(buf))
    return SyncStats(plan.version, plan.nbytes, time.perf_counter() - t0, len(plan.names), checksums)


def receive_weights(group: SyncGroup, plan: SyncPlan, checksums: Optional[list[str]] = None
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """Receiver side: yields ``(name, tensor)`` bucket by bucket as they arrive, so an engine can
    load them while holding one bucket at a time. Appends bucket checksums to ``checksums``."""
    for bucket in plan.buckets:
        buf = torch.empty(sum(s.numel for s in bucket), dtype=bucket[0].torch_dtype, device=group.device)
        group.broadcast(buf)
        if plan.verify and checksums is not None:
            checksums.append(buffer_checksum(buf))
        offset = 0
        for spec in bucket:
            yield spec.name, buf[offset:offset + spec.numel].view(spec.shape)
            offset += spec.numel


def check_checksums(sent: list[str], received: dict[str, list[str]], version: int) -> None:
    """Controller side: every receiver must have seen exactly the sender's buckets."""
    for who, got in received.items():
        if got != sent:
            bad = next((i for i, (a, b) in enumerate(zip(sent, got)) if a != b), min(len(sent), len(got)))
            raise WeightSyncError(
                f"weight sync v{version}: {who} received different bytes than sent (first bad bucket {bad} "
                f"of {len(sent)}); its weights are not the learner's"
            )
