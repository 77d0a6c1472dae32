"""The actor classes the controller starts: learners that can send weights, and rollout workers."""
from __future__ import annotations

from typing import Optional

from ..learner.learner_actor import Learner
from .weight_sync import SyncGroup, SyncGroupInfo, SyncPlan, SyncStats, TensorSpec, send_weights, spec_of


class SyncedLearner(Learner):
    """A learner rank that is also the source (rank 0) of the weight-sync group."""

    sync_group: Optional[SyncGroup] = None

    def join_sync_group(self, info: SyncGroupInfo) -> bool:
        if self.rank == 0:
            self.sync_group = SyncGroup(info, 0)
        return True

    def leave_sync_group(self) -> None:
        if self.sync_group is not None:
            self.sync_group.close()
            self.sync_group = None

    def weight_specs(self, trainable_only: bool) -> list[TensorSpec]:
        """Specs of the tensors to sync, in ``named_weights`` order (not collective: full shapes
        are read from ZeRO-3 metadata, nothing is gathered)."""
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
