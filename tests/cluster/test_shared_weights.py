"""Learner weights living in shared memory (the same-node sync path): under ZeRO-2 with two ranks,
rank 0's DeepSpeed flat buffers move into the region; training is unchanged, the optimizer's
updates land in the region, and checkpoints load back into it."""
from __future__ import annotations

import pytest
import ray
import torch

from vlgrpo.cluster.weight_sync import SharedRegion
from vlgrpo.learner.rank import Learner
from vlgrpo.learner.types import LearnerConfig
from vlgrpo.modules.loading import ModelConfig

from vlgrpo.cluster.actors import SyncedLearner

from ..conftest import group_train_step, kill_group, saved_weights, start_learner_group
from ..learner.conftest import make_batch

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]


def _region_weights(handle, specs) -> dict[str, torch.Tensor]:
    """Read every tensor at its offset through a mapping of our own (as a rollout worker does)."""
    region = SharedRegion.attach(handle)
    out = {}
    for s in specs:
        n = s.nbytes
        out[s.name] = region[s.offset:s.offset + n].view(s.torch_dtype).view(s.shape).clone()
    return out


@pytest.mark.timeout(900)
def test_zero2_weights_live_in_shared_memory(tiny_model_factory, tmp_path):
    path = str(tiny_model_factory("qwen2-vl", size="micro"))
    model = ModelConfig(path=path, module="qwen")
    cfg = LearnerConfig(zero_stage=2, lr=1e-2, adam_eps=1e-2, micro_batch_size=2, grad_clip=1.0, seed=0,
                        num_threads=1, freeze_vision=True)
    local = Learner(LearnerConfig(zero_stage=0), model)
    batches = [make_batch(local.module, local.processor, num_prompts=3, group_size=3, seed=s) for s in (0, 1, 2)]
    shared = start_learner_group(cfg, model, 2, actor_class=SyncedLearner)
    try:
        handle = ray.get(shared[0].share_weights.remote())
        assert ray.get(shared[0].share_weights.remote()) == handle  # once
        specs = ray.get(shared[0].weight_specs.remote(trainable_only=False))

        def frozen_names(lr):  # a nested function travels into the actor by value
            return [lr._ck(n) for n, p in lr.model.named_parameters() if not p.requires_grad]

        frozen = set(ray.get(shared[0].__ray_call__.remote(frozen_names)))
        trainable = [s.name for s in specs if s.name not in frozen]
        # the trainable weights live in the region (nothing to stage for them), the frozen ones do not
        assert frozen and all(s.live == (s.name in trainable) for s in specs)
        assert all(s.offset >= 0 for s in specs) and len({s.offset for s in specs}) == len(specs)
        w0 = saved_weights(shared)
        for b in batches[:2]:
            group_train_step(shared, b)
        w2 = saved_weights(shared)
        in_region = _region_weights(handle, [s for s in specs if s.name in trainable])
        for n in trainable:  # the optimizer's updates are in the region, where receivers read them
            assert torch.equal(in_region[n], w2[n]), n
        assert not torch.equal(w0["lm_head.weight"], w2["lm_head.weight"])

        ck = str(tmp_path / "ck")
        ray.get([a.save_checkpoint.remote(ck) for a in shared])
        group_train_step(shared, batches[2])
        assert not torch.equal(_region_weights(handle, specs)["lm_head.weight"], w2["lm_head.weight"])
        ray.get([a.load_checkpoint.remote(ck) for a in shared])  # loads back into the shared buffers
        back = _region_weights(handle, [s for s in specs if s.name in trainable])
        assert all(torch.equal(back[n], w2[n]) for n in trainable)
    finally:
        kill_group(shared)

    plain = start_learner_group(cfg, model, 2, actor_class=SyncedLearner)
    try:  # the same two steps without shared memory: bit-identical weights
        for b in batches[:2]:
            group_train_step(plain, b)
        w2_plain = saved_weights(plain)
        assert set(w2_plain) == set(w2)
        for n in w2:
            assert torch.equal(w2_plain[n], w2[n]), n
    finally:
        kill_group(plain)
