"""The controller's batch: DAPO dynamic sampling (groups without a reward spread dropped, the batch
refilled with extra generation rounds: trainer.dynamic_sampling_rounds) and the advantages of each algorithm."""
from __future__ import annotations

import statistics

import pytest
import torch

from vlgrpo.cluster.controller import Trainer
from vlgrpo.learner.grpo import group_advantages
from vlgrpo.rollout.types import RolloutBatch
from vlgrpo.tests.conftest import small_run_config


def _rollout(tag: str, group_rewards: list[list[float]]) -> RolloutBatch:
    g, n = len(group_rewards[0]), len(group_rewards)
    rewards = torch.tensor([r for grp in group_rewards for r in grp]).unsqueeze(1)
    ids = torch.arange(n * g * 3).view(n * g, 3)
    return RolloutBatch(sample_ids=[f"{tag}{i}" for i in range(n)], prompts_text=[f"p{tag}{i}" for i in range(n)],
                        images=[[] for _ in range(n)], completion_ids=ids, completion_mask=torch.ones(n * g, 3),
                        sampling_logprobs=-ids.float(), rewards=rewards, reward_names=["r"], reward_weights=[1.0],
                        completions_text=[f"{tag}{i}" for i in range(n * g)], finish_reasons=["stop"] * n * g,
                        weights_version=0, group_size=g)


def test_drops_flat_groups_and_refills_from_extra_rounds(tmp_path):
    cfg = small_run_config(tmp_path, "trainer.dynamic_sampling_rounds=2")
    trainer, launched = Trainer(cfg), []
    rounds = {1: _rollout("b", [[1, 1], [0, 1], [1, 0], [0, 0]]),  # round 1: groups 1 and 2 have a spread
              2: _rollout("c", [[1, 1], [0, 0]])}  # round 2: none
    trainer.launch = lambda step, r=0: launched.append((step, r)) or r
    trainer.collect = lambda r: rounds[r]
    first = _rollout("a", [[0, 0], [1, 0], [1, 1], [0, 0]])  # only group 1 has a spread
    batch, m = trainer.dynamic_sampling(first)
    assert launched == [(0, 1), (0, 2)]  # 1 + 2 + 0 groups < prompts_per_step=4 after both extra rounds
    assert batch.sample_ids == ["a1", "b1", "b2"]
    assert batch.completions_text == ["a2", "a3", "b2", "b3", "b4", "b5"]
    assert torch.equal(batch.completion_ids, torch.cat([first.completion_ids[2:4], rounds[1].completion_ids[2:6]]))
    assert torch.equal(batch.rewards.flatten(), torch.tensor([1.0, 0, 0, 1, 1, 0]))
    assert group_advantages(batch.total_rewards(), 2)[1] == 0  # no flat group reaches the learner
    assert m == {"sampling/extra_rounds": 2.0, "sampling/dropped_groups": 7.0, "sampling/kept_groups": 3.0}

    rounds[1] = _rollout("b", [[0, 1], [1, 0], [0, 1], [1, 0]])
    launched.clear()
    batch, m = trainer.dynamic_sampling(first)
    assert launched == [(0, 1)] and batch.sample_ids == ["a1", "b0", "b1", "b2"]  # the surplus b3 is dropped
    assert m["sampling/kept_groups"] == 4.0 and m["sampling/dropped_groups"] == 3.0


def test_no_spread_anywhere_trains_on_the_last_round(tmp_path):
    trainer = Trainer(small_run_config(tmp_path, "trainer.dynamic_sampling_rounds=1"))
    flat = _rollout("b", [[1, 1], [0, 0]])
    trainer.launch, trainer.collect = (lambda step, r=0: r), (lambda r: flat)
    batch, m = trainer.dynamic_sampling(_rollout("a", [[0, 0], [0, 0]]))
    assert batch is flat and m["sampling/kept_groups"] == 0.0 and m["sampling/extra_rounds"] == 1.0


def test_off_by_default_changes_nothing(tmp_path):
    trainer = Trainer(small_run_config(tmp_path))
    first = _rollout("a", [[0, 0], [1, 0]])
    assert trainer.dynamic_sampling(first) == (first, {})


@pytest.mark.slow
def test_async_run_trains_only_on_groups_with_a_spread(tmp_path, ray_session):
    from vlgrpo.cluster.controller import train

    cfg = small_run_config(tmp_path, "trainer.total_steps=3", "trainer.mode=async", "trainer.dynamic_sampling_rounds=4",
                           "rollout.rewards=[{name: vlgrpo.tests.plugins:length_parity}]", prompts=4, group_size=2)
    history = train(cfg)
    assert [h["step"] for h in history] == [1, 2, 3]
    assert sum(h["sampling/dropped_groups"] for h in history) > 0  # flat groups were generated ...
    for h in history:  # ... and none reached the learner, whose batch is full
        assert h["reward/zero_std_groups"] == 0.0 and h["sampling/kept_groups"] == 4.0
        assert h["learner/num_seqs"] == 8.0
    assert [h["staleness/mean"] for h in history] == [0.0, 1.0, 1.0]


@pytest.mark.parametrize("overrides, scaled", [((), True), (("learner.algorithm=rloo",), False),
                                               (("learner.algorithm=rloo", "learner.scale_adv_by_std=true"), True)])
def test_advantages_follow_the_configured_algorithm(tmp_path, overrides, scaled):
    """The run's advantages (what the controller sends the learners) from the config as a user writes it:
    RLOO's leave-one-out baseline is unscaled unless scale_adv_by_std is set (it once came out scaled)."""
    trainer = Trainer(small_run_config(tmp_path, *overrides))
    rollout = _rollout("a", [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5]])
    batch, _ = trainer.advantages(rollout)
    rloo = bool(overrides)
    g = [1.0, 0.0, 0.0]
    expected = [r - (sum(g) - r) / 2 if rloo else r - sum(g) / 3 for r in g]
    if scaled:
        expected = [a / (statistics.stdev(g) + 1e-4) for a in expected]
    torch.testing.assert_close(batch.advantages, torch.tensor(expected + [0.0] * 3))
