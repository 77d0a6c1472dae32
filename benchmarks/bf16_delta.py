"""How much of a bf16 copy of the weights changes per GRPO step: the case for syncing deltas.

A rollout engine holds the learner's weights cast to bf16. After an optimiser step only the
elements whose bf16 rounding moved need to travel. This runs real GRPO/Adam steps of the package's
``Learner`` (plain torch, ``zero_stage=0``, fp32 master weights on the CPU) on tiny random
Qwen2-VL models (``modules.tiny.build_tiny_model``) with random completions and advantages, casts
every trainable tensor to bf16 before and after each step, and counts changed elements.

    python -m vlgrpo.benchmarks.bf16_delta                         # tiny and small, lr 5e-4 and 1e-6, 6 steps
    python -m vlgrpo.benchmarks.bf16_delta --sizes tiny --lrs 1e-6 --steps 4

Reported per (model, lr): the fraction of bf16 elements that change per step (first step and the
mean of the later ones: Adam's first update is lr * sign(g) for every element), the cumulative
fraction after all steps (a sync every k steps), split into matrices (>= 2-D) and vectors (norms,
biases: these start at exactly 1 or 0), and what a delta costs against the full bf16 payload:
a bitmask (1 bit per element) plus the changed values, ``1/16 + f``, or 32-bit indices plus
values, ``3 f``. The RESULT line: the mean per-step changed fraction at lr 1e-6 for the largest
model.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from typing import Optional

import torch

from ._common import machine, result, table


def make_batch(module, processor, num_prompts: int, group_size: int, max_len: int, seed: int):
    """Random completions of the synthetic colour prompts with random advantages (as the learner tests do)."""
    from PIL import Image

    from vlgrpo.learner.types import TrainBatch

    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    examples, images = [], []
    for i in range(num_prompts):
        examples.append({"prompt": [{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}]})
        images.append([Image.new("RGB", (56, 56), colours[(i + seed) % len(colours)])])
    texts = module.prepare_prompt(processor, examples)
    g = torch.Generator().manual_seed(seed)
    n = num_prompts * group_size
    ids = torch.randint(20, 480, (n, max_len), generator=g)
    lengths = torch.randint(2, max_len + 1, (n,), generator=g)
    mask = (torch.arange(max_len).unsqueeze(0) < lengths.unsqueeze(1)).long()
    pad = module.tokenizer(processor).pad_token_id
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad))
    return TrainBatch(prompts_text=texts, images=images, completion_ids=ids, completion_mask=mask,
                      advantages=torch.randn(n, generator=g))


def bf16_state(learner) -> dict[str, torch.Tensor]:
    return {n: p.detach().to(torch.bfloat16).clone() for n, p in learner.model.named_parameters() if p.requires_grad}


def changed(before: dict, after: dict) -> tuple[dict[str, int], dict[str, int]]:
    """(changed elements, all elements) per kind: 'matrix' (>= 2-D) and 'vector'."""
    ch, tot = {"matrix": 0, "vector": 0}, {"matrix": 0, "vector": 0}
    for n, a in after.items():
        kind = "matrix" if a.dim() >= 2 else "vector"
        # bit patterns, so that -0.0 vs 0.0 or a NaN would count as the bytes they are
        ch[kind] += int((a.view(torch.int16) != before[n].view(torch.int16)).sum())
        tot[kind] += a.numel()
    return ch, tot


def run(size: str, lr: float, steps: int, prompts: int, group: int, max_len: int, threads: int, root: str) -> dict:
    from vlgrpo.learner.rank import Learner
    from vlgrpo.learner.types import LearnerConfig
    from vlgrpo.modules.loading import ModelConfig
    from vlgrpo.modules.tiny import build_tiny_model

    path = build_tiny_model("qwen2-vl", f"{root}/qwen2-vl-{size}", size=size)
    cfg = LearnerConfig(zero_stage=0, lr=lr, beta=0.0, micro_batch_size=prompts * group, seed=0, num_threads=threads)
    learner = Learner(cfg, ModelConfig(path=str(path), module="qwen"))
    start = prev = bf16_state(learner)
    per_step, t0 = [], time.perf_counter()
    for k in range(steps):
        learner.train_step(make_batch(learner.module, learner.processor, prompts, group, max_len, seed=k))
        cur = bf16_state(learner)
        per_step.append(changed(prev, cur))
        prev = cur
    cum = changed(start, prev)
    numel = sum(cum[1].values())
    frac = [sum(c.values()) / numel for c, _ in per_step]
    later = frac[1:] or frac
    return {"params": numel, "first": frac[0], "later_mean": sum(later) / len(later), "later_max": max(later),
            "matrix": sum(c["matrix"] for c, _ in per_step[1:] or per_step) / len(later) / max(1, cum[1]["matrix"]),
            "vector": sum(c["vector"] for c, _ in per_step[1:] or per_step) / len(later) / max(1, cum[1]["vector"]),
            "cumulative": sum(cum[0].values()) / numel, "seconds": time.perf_counter() - t0}


def delta_cost(f: float) -> float:
    """Bytes of the cheaper delta encoding over the full bf16 payload: bitmask + values (1/16 + f)
    or 32-bit indices + values (3 f)."""
    return min(1 / 16 + f, 3 * f)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,small", help="tiny-model size presets (modules/tiny.py SIZES)")
    ap.add_argument("--lrs", default="5e-4,1e-6", help="learning rates (5e-4: the demo's; 1e-6: a 3B-7B VLM's)")
    ap.add_argument("--steps", type=int, default=6, help="optimiser steps per run")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    print(f"machine: {machine()}", flush=True)
    rows, last = [], {}
    with tempfile.TemporaryDirectory() as root:
        for size in args.sizes.split(","):
            for lr in (float(x) for x in args.lrs.split(",")):
                r = run(size, lr, args.steps, args.prompts, args.group_size, args.max_tokens, args.threads, root)
                rows.append([size, f"{r['params'] / 1e6:.2f}M", f"{lr:g}", r["first"], r["later_mean"], r["later_max"],
                             r["matrix"], r["vector"], f"{r['cumulative']:.3f} after {args.steps}",
                             delta_cost(r["later_mean"]), r["seconds"]])
                print(f"  done: {size}, lr {lr:g} ({r['seconds']:.0f}s)", flush=True)
                last[lr] = r
    print(table(["model", "trainable", "lr", "changed, step 1", "changed/step, later (mean)", "later (max)",
                 "matrices", "vectors", "cumulative", "delta bytes / bf16 bytes", "s"], rows,
                title="fraction of bf16 elements changed by one GRPO/Adam step (qwen2-vl tiny models, zero_stage 0, "
                      "grad_clip 1, random completions and advantages)"))
    lr_key = min(last, key=lambda x: abs(x - 1e-6))
    result(f"bf16_changed_per_step_lr{lr_key:g}", last[lr_key]["later_mean"])


if __name__ == "__main__":
    from vlgrpo.benchmarks.bf16_delta import main as _main

    _main()
