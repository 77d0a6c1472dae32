"""Async overlap: the same tiny run in ``trainer.mode=sync`` (on-policy) and ``trainer.mode=async``
(one-step off-policy: the next step's prompts are generated while the learner updates), through the
real controller: tiny Qwen2-VL, synthetic colour task, 1 learner (``zero_stage=0``), 1 rollout
worker (transformers engine).

    python -m vlgrpo.benchmarks.async_overlap                  # 8 measured steps per mode
    python -m vlgrpo.benchmarks.async_overlap --steps 12 --rounds 2 --size micro

Every mode runs ``--warmup`` untimed steps, then ``--steps`` timed ones; with ``--rounds`` > 1 the
modes alternate (sync, async, sync, async, ...) and the means over rounds are reported. The learner
and the rollout worker get ``--threads`` torch threads each (default 1: one core each on this
2-core machine; the package default would give the learner 2 and oversubscribe the cores in async
mode), the same in both modes.
Headline: async wall time per step / sync wall time per step (< 1: async is faster).
"""
from __future__ import annotations

import argparse
import time
from typing import Optional

from ._common import machine, result, table
from ._vlgrpo_run import PHASES, run_vlgrpo


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny", choices=["micro", "tiny", "small"], help="tiny-model preset")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per mode and round")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=8, help="trainer.prompts_per_step")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the learner and of the rollout worker")
    ap.add_argument("--set", nargs="*", default=[], help="extra config overrides, e.g. rollout.num_threads=2")
    args = ap.parse_args(argv)

    base = [
        "model.tiny_family=qwen2-vl", f"model.tiny_size={args.size}", "data.synthetic_task=color",
        "learner.num_ranks=1", "learner.zero_stage=0", "rollout.num_workers=1", "rollout.engine=transformers",
        f"trainer.prompts_per_step={args.prompts}", f"rollout.group_size={args.group_size}",
        f"rollout.max_tokens={args.max_tokens}", f"learner.micro_batch_size={args.prompts * args.group_size}",
        f"learner.num_threads={args.threads}", f"rollout.num_threads={args.threads}",
    ] + list(args.set)
    print(f"machine: {machine()}", flush=True)
    print("config: " + " ".join(base), flush=True)
    runs: dict[str, list[dict]] = {"sync": [], "async": []}
    t_all = time.perf_counter()
    for r in range(args.rounds):
        for mode in ("sync", "async"):
            res = run_vlgrpo(base + [f"trainer.mode={mode}"], args.steps, args.warmup)
            runs[mode].append(res)
            print(f"  round {r + 1} {mode}: {res['step_s']:.3f} s/step (setup {res['setup_s']:.0f}s; "
                  f"{time.perf_counter() - t_all:.0f}s so far)", flush=True)

    def m(mode: str, key: str) -> float:
        return sum(x[key] for x in runs[mode]) / len(runs[mode])

    rows = [[name, m("sync", key), m("async", key), m("async", key) / m("sync", key) if m("sync", key) else float("nan")]
            for name, key in PHASES]
    rows.append(["staleness (versions)", m("sync", "staleness"), m("async", "staleness"), float("nan")])
    rows.append(["completion tokens / step", m("sync", "completion_tokens"), m("async", "completion_tokens"), float("nan")])
    print(table(["phase (mean seconds per step)", "sync", "async", "async / sync"], rows,
                title=f"sync vs async, {args.steps} steps x {args.rounds} round(s) per mode after {args.warmup} warm-up"))
    ratio = m("async", "step_s") / m("sync", "step_s")
    print(f"\nwall time per step: sync {m('sync', 'step_s'):.3f} s, async {m('async', 'step_s'):.3f} s -> "
          f"async/sync {ratio:.3f}")
    result("async_over_sync_step_time", ratio)


if __name__ == "__main__":
    from vlgrpo.benchmarks.async_overlap import main as _main

    _main()
