"""The actor shells (the fleet runs them with ``ray.remote``): ``learner.Learner`` and
``rollout.RolloutWorker`` know nothing of the sync; here learner rank 0 becomes its source (live
weights in shared memory for receivers on its node) and a rollout worker a receiver (a multi-process
vLLM engine's workers join themselves, through ``weight_sync.WeightSyncExtension``)."""
from __future__ import annotations

import logging
import os
import pickle
import time
from typing import Any, Optional

import ray
import torch

from . import placement
from ..learner.rank import Learner
from ..modules.loading import ModelConfig
from ..rollout.worker import RolloutConfig, RolloutWorker
from .weight_sync import (
    SharedRegion, SyncGroup, SyncGroupInfo, SyncPlan, SyncReport, TensorSpec, WeightSyncError, aligned, packed_bytes,
    receive_weights, send_weights,
)

log = logging.getLogger("vlgrpo")

VLLM_EXTENSION = {"worker_extension_cls": "vlgrpo.cluster.weight_sync.WeightSyncExtension"}


class Threads:
    def set_threads(self, n: int) -> None:
        """This process's torch threads (the fleet's allotment, ``placement.thread_shares``)."""
        torch.set_num_threads(n)


class SyncedLearner(Threads, Learner):
    """A learner rank; rank 0 is also the source (group rank 0) of the weight-sync group."""

    sync_group: Optional[SyncGroup] = None
    shared: Optional[SharedRegion] = None  # rank 0's live weights, when same-node workers read them
    shm_offsets: dict[str, int] = {}
    shm_live: frozenset[str] = frozenset()  # names whose live tensor is in the region

    def share_weights(self) -> tuple[int, int, int]:
        """Move rank 0's live weights into a :class:`SharedRegion` (once) and return its handle.

        The storage ``movable_buffers`` names (ZeRO-1/2 flat buffers, or the parameters at stage
        0) moves into the region and the parameters are re-pointed at it: the optimizer then
        updates the weights in shared memory and a sync costs the receivers one copy. Tensors that
        stay elsewhere (frozen ones, ZeRO-3 shards, merged conversions) get a staging slot."""
        if self.shared is not None:
            return self.shared.handle
        if self.rank != 0 or self.device.type != "cpu":
            raise WeightSyncError("shared-memory weight sync is for learner rank 0 with CPU weights")
        buffers, repoint = self.movable_buffers()
        ranges = [(b.data_ptr(), b.data_ptr() + b.numel() * b.element_size()) for b in buffers]
        live = dict(self.named_weights()) if buffers and self._name_map is not None else {}
        specs = self.weight_specs(trainable_only=False)
        staged = {s.name for s in specs
                  if not (s.name in live and any(lo <= live[s.name].data_ptr() < hi for lo, hi in ranges))}
        staged_bytes = packed_bytes([s for s in specs if s.name in staged])
        region = SharedRegion(sum(aligned(b.numel() * b.element_size()) for b in buffers) + staged_bytes)
        for b in buffers:
            region.adopt(b)
        repoint()
        live = dict(self.named_weights()) if live else {}
        offsets = {}
        for s in specs:
            offsets[s.name] = region.alloc(s.nbytes) if s.name in staged else region.offset_of(live[s.name])
            if offsets[s.name] < 0:  # would silently train weights the receivers never see
                raise WeightSyncError(f"{s.name} did not move into shared memory with its buffer (unexpected "
                                      "DeepSpeed layout); set sync.transport=broadcast")
        self.shared, self.shm_offsets = region, offsets
        self.shm_live = frozenset(n for n in offsets if n not in staged)
        log.info("learner weights in shared memory: %.1f MB live there, %.1f MB staged",
                 (region.used - staged_bytes) / 2**20, staged_bytes / 2**20)
        return region.handle

    def where(self) -> tuple[str, tuple[int, ...]]:
        return placement.where()

    def join_sync_group(self, info: SyncGroupInfo) -> str:
        """Rank 0 joins; returns its NCCL_CUMEM_ENABLE (every member's must agree)."""
        if self.rank == 0:
            self.sync_group = SyncGroup(info, 0, self.shared)
        return os.environ.get("NCCL_CUMEM_ENABLE", "unset")

    def leave_sync_group(self) -> None:
        if self.sync_group is not None:
            self.sync_group.close()
            self.sync_group = None

    def weight_specs(self, trainable_only: bool) -> list[TensorSpec]:
        """Specs of the tensors to sync, in ``named_weights`` order, with their shared-memory
        offsets once ``share_weights`` ran (not collective)."""
        return [TensorSpec(n, shape, dtype, self.shm_offsets.get(n, -1), n in self.shm_live)
                for n, shape, dtype in self.weights_meta(trainable_only)]

    def send_weights(self, plan: SyncPlan) -> Optional[SyncReport]:
        """Collective over the learner group (ZeRO-3 gathers only the planned tensors); rank 0 sends ``plan``.
        ZeRO-3 on several ranks: every gather ends before rank 0 sends anything (to the host), so no
        learner collective waits on a sync transfer and no transfer waits on the other ranks."""
        wanted = set(plan.names)
        if self.cfg.zero_stage == 3 and self.world_size > 1:
            named = iter(self.gathered_weights(wanted, device="cpu"))
        else:
            named = self.named_weights(names=wanted)
        report = None
        if self.rank == 0:
            if self.sync_group is None:
                raise WeightSyncError("learner rank 0 has not joined the weight-sync group")
            report = send_weights(self.sync_group, plan, named)
        for _ in named:  # drain: every rank's ZeRO-3 gathers must be matched
            pass
        return report


class SyncedWorker(Threads, RolloutWorker):
    """A rollout worker that receives weights from the sync group."""

    def __init__(self, cfg: RolloutConfig, model: ModelConfig, worker_id: int, seed: int) -> None:
        super().__init__(cfg, model, worker_id, seed, extra_engine_kwargs=VLLM_EXTENSION)
        self.sync_group: Optional[SyncGroup] = None
        # A multi-process vLLM engine joins from its own worker processes, one rank each.
        self.engine_members = not getattr(self.engine, "in_process", True)

    def health(self) -> dict[str, Any]:
        node_ip, gpu_ids = placement.where()
        return {**super().health(), "node_ip": node_ip, "gpu_ids": gpu_ids,
                "sync_ranks": self.engine.llm.llm_engine.vllm_config.parallel_config.world_size
                if self.engine_members else 1}

    def join_sync_group(self, info: SyncGroupInfo, rank: int) -> str:
        """Join (an engine's worker processes join themselves); returns NCCL_CUMEM_ENABLE as the members see it."""
        if self.engine_members:
            return self.engine.llm.collective_rpc("vlgrpo_join_sync_group", kwargs={"info": pickle.dumps(info),
                                                                                    "rank": rank})[0][1]
        self.sync_group = SyncGroup(info, rank)
        return os.environ.get("NCCL_CUMEM_ENABLE", "unset")

    def leave_sync_group(self) -> None:
        if self.engine_members:
            self.engine.llm.collective_rpc("vlgrpo_leave_sync_group")
        elif self.sync_group is not None:
            self.sync_group.close()
        self.sync_group = None

    def receive_weights(self, plan: SyncPlan) -> SyncReport:
        """Take part in one sync of ``plan``, loading each bucket into the engine as it arrives."""
        t0 = time.perf_counter()
        if self.engine_members:
            report = pickle.loads(self.engine.llm.collective_rpc("vlgrpo_receive_weights",
                                                                 kwargs={"plan": pickle.dumps(plan)})[0])
            self.engine.loaded(plan.version)
        else:
            if self.sync_group is None:
                raise WeightSyncError(f"rollout worker {self.worker_id} has not joined the weight-sync group")
            report = SyncReport(plan.version, 0)
            report.num_tensors = self.load_weights(receive_weights(self.sync_group, plan, report.checksums),
                                                   plan.version)
        report.version, report.seconds = self.engine.weights_version, time.perf_counter() - t0
        report.member = f"rollout worker {self.worker_id} (pid {os.getpid()})"
        return report
