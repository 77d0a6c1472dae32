"""The actor classes the controller starts: learners that can send weights, and rollout workers."""
from __future__ import annotations

import logging
from typing import Optional

from ..learner.learner_actor import Learner
from .weight_sync import (
    SharedRegion, SyncGroup, SyncGroupInfo, SyncPlan, SyncStats, TensorSpec, WeightSyncError, aligned, packed_bytes,
    send_weights, spec_of,
)

log = logging.getLogger(__name__)


class SyncedLearner(Learner):
    """A learner rank that is also the source (rank 0) of the weight-sync group."""

    sync_group: Optional[SyncGroup] = None
    shared: Optional[SharedRegion] = None  # rank 0's live weights, when same-node workers read them
    shm_offsets: dict[str, int] = {}
    shm_live: frozenset[str] = frozenset()  # names whose live tensor is in the region

    def join_sync_group(self, info: SyncGroupInfo) -> bool:
        if self.rank == 0:
            self.sync_group = SyncGroup(info, 0, self.shared)
        return True

    # -- same-node shared memory ----------------------------------------------------------------------
    def share_weights(self) -> tuple[int, int, int]:
        """Move rank 0's live weights into a :class:`SharedRegion` (once) and return its handle.

        Under ZeRO-1/2 DeepSpeed keeps the trainable parameters as views of one flat buffer per
        parameter group: those buffers move into the region and the parameters are re-pointed, as
        DeepSpeed's own ``reload_states`` does; at stage 0 the trainable parameters move themselves.
        The optimizer then updates the weights in shared memory, and a sync costs the receivers one
        copy. Tensors that stay elsewhere (frozen ones, ZeRO-3 shards, merged conversions) get a
        staging slot in the region that ``send_weights`` copies into."""
        if self.shared is not None:
            return self.shared.handle
        if self.rank != 0 or self.device.type != "cpu":
            raise WeightSyncError("shared-memory weight sync is for learner rank 0 with CPU weights")
        buffers, repoint = self._placeable_buffers()
        ranges = [(b.data_ptr(), b.data_ptr() + b.numel() * b.element_size()) for b in buffers]
        live = dict(self.named_weights()) if self.cfg.zero_stage != 3 and self._name_map is not None else {}

        def inside(name: str) -> bool:
            t = live.get(name)
            return t is not None and any(lo <= t.data_ptr() < hi for lo, hi in ranges)

        specs = self.weight_specs(trainable_only=False)
        staged = [s for s in specs if not inside(s.name)]
        staged_names = {s.name for s in staged}
        staged_bytes = packed_bytes(staged)
        region = SharedRegion(sum(aligned(b.numel() * b.element_size()) for b in buffers) + staged_bytes)
        for b in buffers:
            region.adopt(b)
        repoint()
        offsets = {}
        live = dict(self.named_weights()) if live else {}
        for s in specs:
            if s.name in staged_names:
                offsets[s.name] = region.alloc(s.nbytes)
            else:
                offsets[s.name] = region.offset_of(live[s.name])
                if offsets[s.name] < 0:  # would silently train weights the receivers never see
                    raise WeightSyncError(f"{s.name} did not move into shared memory with its buffer (unexpected "
                                          "DeepSpeed layout); set sync.transport=broadcast")
        self.shared, self.shm_offsets = region, offsets
        self.shm_live = frozenset(n for n in offsets if n not in staged_names)
        log.info("learner weights in shared memory: %.1f MB live there, %.1f MB staged",
                 (region.used - staged_bytes) / 2**20, sum(s.nbytes for s in staged) / 2**20)
        return region.handle

    def _placeable_buffers(self):
        """(buffers whose storage may move into shared memory, a function re-pointing the
        parameters at them once moved)."""
        opt = getattr(self, "optimizer", None)
        if self.cfg.zero_stage == 3:
            return [], lambda: None
        if self.use_deepspeed:
            if not all(hasattr(opt, a) for a in ("bit16_groups_flat", "parallel_partitioned_bit16_groups",
                                                 "get_data_parallel_partitions", "_update_model_bit16_weights")):
                log.warning("DeepSpeed optimizer %s has no flat parameter buffers: weights are staged per sync",
                            type(opt).__name__)
                return [], lambda: None

            def repoint() -> None:  # what DeepSpeed's ZeRO-1/2 reload_states does after moving the buffers
                parts = opt.parallel_partitioned_bit16_groups
                parts.clear()
                for i, flat in enumerate(opt.bit16_groups_flat):
                    parts.append(opt.get_data_parallel_partitions(flat, i))
                for i in range(len(opt.bit16_groups_flat)):
                    opt._update_model_bit16_weights(i)

            return list(opt.bit16_groups_flat), repoint
        # stage 0: the parameters themselves (``adopt`` re-points ``param.data``; AdamW updates in place)
        return [p for p in self.model.parameters() if p.requires_grad and p.is_contiguous()], lambda: None

    def placed_weights(self) -> dict[str, bool]:
        """Checkpoint name -> whether the live tensor is in the shared region (for tests/metrics)."""
        if self.shared is None:
            return {}
        if self.cfg.zero_stage == 3:  # nothing lives there (and named_weights would be collective)
            return {n: False for n in self.shm_offsets}
        return {n: n in self.shm_live and self.shared.offset_of(t) == self.shm_offsets.get(n)
                for n, t in self.named_weights()}

    def leave_sync_group(self) -> None:
        if self.sync_group is not None:
            self.sync_group.close()
            self.sync_group = None

    def weight_specs(self, trainable_only: bool) -> list[TensorSpec]:
        """Specs of the tensors to sync, in ``named_weights`` order (not collective: full shapes
        are read from ZeRO-3 metadata, nothing is gathered)."""
        specs = self._weight_specs(trainable_only)
        if self.shm_offsets:
            specs = [TensorSpec(s.name, s.shape, s.dtype, self.shm_offsets[s.name], s.name in self.shm_live)
                     for s in specs]
        return specs

    def _weight_specs(self, trainable_only: bool) -> list[TensorSpec]:
        keep = set(self.trainable_names()) if trainable_only else None
        try:
            meta = self.weights_meta()
        except NotImplementedError:  # checkpoint conversion merges tensors: read them for real
            if self.cfg.zero_stage == 3:
                raise NotImplementedError("weight sync of a model whose checkpoint conversion merges tensors "
                                          "is not supported under ZeRO-3; use learner.zero_stage=2")
            return [spec_of(n, t) for n, t in self.named_weights(all_ranks=True)
                    if keep is None or n in keep]
        return [TensorSpec(n, tuple(shape), dtype) for n, shape, dtype in meta if keep is None or n in keep]

    def send_weights(self, plan: SyncPlan) -> Optional[SyncStats]:
        """Collective over the learner group; rank 0 broadcasts ``plan`` to the rollout workers."""
        device = "cuda" if self.sync_group is not None and self.sync_group.info.backend == "nccl" else None
        named = self.named_weights(device=device)
        if self.rank != 0:
            for _ in named:  # take part in the ZeRO-3 gathers
                pass
            return None
        if self.sync_group is None:
            raise RuntimeError("learner rank 0 has not joined the weight-sync group")
        stats = send_weights(self.sync_group, plan, named)
        for _ in named:  # drain: the other ranks' ZeRO-3 gathers must all be matched
            pass
        return stats


def learner_actor_class():
    import ray

    return ray.remote(SyncedLearner)


def rollout_actor_class():
    import ray

    from ..rollout.worker import RolloutWorker

    return ray.remote(RolloutWorker)
