"""vlgrpo vs TRL: GRPO steps/s on CPU with the same tiny Qwen2-VL model, data, group size, batch,
completion length and optimizer settings.

    bash benchmarks/setup_trl_env.sh                     # once: TRL in its own venv (.venv-trl)
    python -m vlgrpo.benchmarks.step_vs_trl              # micro, small, then small with long prompts
    python -m vlgrpo.benchmarks.step_vs_trl --size small # ~20M params (compute dominates): the headline
    python -m vlgrpo.benchmarks.step_vs_trl --size micro # ~0.2M params (fixed per-step overhead dominates)

vlgrpo: the real controller (``Trainer``), 1 learner (``zero_stage=0``), 1 rollout worker
(transformers engine), modes ``sync`` and ``async``; per-phase timers come from subclasses of the
package's actors (``_vlgrpo_run``). TRL: ``GRPOTrainer`` in one process, run in the separate venv
(``--trl-python``, default ``.venv-trl/bin/python``) through this same file (``--trl-worker``).

Both sides, set explicitly: fp32, no gradient checkpointing, torch ``AdamW`` (not fused/foreach:
``optim=adamw_torch`` in TRL), betas (0.9, 0.999), eps 1e-8, weight decay 0, constant LR (no
warm-up), max grad norm 1.0, loss ``grpo`` (per-sequence token mean, then mean over sequences),
beta 0 (no reference model), epsilon 0.2, one optimiser step per generation batch
(``num_iterations=1``, one micro-batch of prompts x group rows), std-scaled group advantages,
temperature 1.0, top-p 1.0, no top-k, the same reward (vlgrpo's ``accuracy``,
weight 1.0, called through vlgrpo's ``RewardSet`` on the TRL side too) and the same cores: by default
(``--threads 0``) TRL's single process gets all the machine's cores as torch threads and vlgrpo its own
allotment (``placement.thread_shares``: sync, each phase all of the node's cores; async, split between
the learner and the worker); ``--threads N`` sets N torch threads per process on both sides instead. vlgrpo keeps its default ``sync.verify=true`` (checksums of every synced bucket)
and its default ``learner.shared_prefix=true`` (each prompt's forward once for its G rows);
``--shared-prefix both`` also runs each mode with it off ("per-row") to compare learner times.

Each side runs ``--warmup`` untimed steps, then ``--steps`` timed ones. Also printed: learner tokens/s
(prompt + completion tokens of every row, as a per-row learner runs them, per second of learner step) and
the prompt tokens the shared prefix saves a step. Cases: each ``--size`` with ``--image-size`` (56 px: 4 image
tokens, a 46-token prompt), then the largest size with ``--long-image-size`` (420 px: 225 image tokens, a 267-token
prompt, as real VLM prompts are; 0 skips it). Headline (``RESULT``): vlgrpo's best mode steps/s / TRL steps/s at
the largest size, short prompts; the long-prompt ratio is printed just before it.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from ._common import machine, result, table

ROOT = Path(__file__).resolve().parents[1]

# (row label, vlgrpo key, TRL key)
PHASES = [
    ("step wall", "step_s", "step_s"),
    ("generation (engine)", "worker_generate_s", "generate_s"),
    ("scoring (rewards)", "worker_reward_s", "scoring_s"),
    ("rollout other (TRL: inputs, padding, advantages)", None, "rollout_other_s"),
    ("driver blocked on rollout", "driver_wait_generation_s", None),
    ("learner: processor inputs", "learner_prepare_s", None),
    ("forward (training)", "learner_forward_s", "forward_s"),
    ("backward", "learner_backward_s", "backward_s"),
    ("optimizer step", "learner_optimizer_s", "optimizer_s"),
    ("learner other (log-probs, loss, clip; TRL: + loop)", "learner_other_s", "train_other_s"),
    ("learner step (all of the above)", "learner_step_s", None),
    ("driver blocked on learner", "driver_learner_call_s", None),
    ("weight sync", "sync_s", None),
    ("driver other", "driver_other_s", None),
]


# ------------------------------------------------------------------------------------------------
# shared inputs
# ------------------------------------------------------------------------------------------------
def prepare(size: str, work: Path, n_data: int, image_size: int = 56) -> tuple[str, str, int]:
    from vlgrpo.modules.tiny import build_tiny_model
    from vlgrpo.rollout.synthetic import make_dataset

    model_dir = work / f"qwen2-vl-{size}-{image_size}px"
    if not (model_dir / "config.json").exists():
        build_tiny_model("qwen2-vl", model_dir, seed=0, size=size)
        if image_size > 56:  # the tiny processor caps an image at 16 tokens: let these through whole
            from transformers import AutoProcessor
            proc = AutoProcessor.from_pretrained(model_dir)
            proc.image_processor.size = {"shortest_edge": proc.image_processor.size.shortest_edge,
                                         "longest_edge": image_size * image_size}
            proc.save_pretrained(model_dir)
    jsonl = work / f"data-{image_size}px" / "data.jsonl"
    if not jsonl.exists():
        make_dataset("color", n_data, jsonl.parent, seed=0, image_size=image_size)
    meta = json.loads((model_dir / "vlgrpo_tiny.json").read_text())
    return str(model_dir), str(jsonl), int(meta["num_parameters"])


def prompt_tokens(model: str, data: str) -> int:
    """Tokens of the first prompt (text and image) as the model sees it."""
    from vlgrpo.modules import get_module
    from vlgrpo.modules.loading import load_processor
    from vlgrpo.rollout.data import DataSource, load_datasets

    module, sample = get_module("qwen"), load_datasets([DataSource(data)])[0]
    proc = load_processor(model, module)
    text = module.prepare_prompt(proc, [{"prompt": sample.prompt}])
    return int(module.prepare_model_inputs(proc, text, [sample.images])["input_ids"].shape[1])


# ------------------------------------------------------------------------------------------------
# the vlgrpo side
# ------------------------------------------------------------------------------------------------
def run_vlgrpo_side(spec: dict[str, Any], mode: str, shared_prefix: bool = True) -> dict[str, Any]:
    from ._vlgrpo_run import run_vlgrpo

    t = spec["threads"]
    overrides = [
        f"model.path={spec['model']}", f"data.sources=[{{path: {spec['data']}}}]",
        "learner.num_ranks=1", "learner.zero_stage=0", "rollout.num_workers=1", "rollout.engine=transformers",
        f"trainer.prompts_per_step={spec['prompts']}", f"rollout.group_size={spec['group_size']}",
        f"rollout.max_tokens={spec['max_tokens']}", "rollout.temperature=1.0", "rollout.top_p=1.0", "rollout.top_k=-1",
        f"learner.micro_batch_size={spec['prompts'] * spec['group_size']}",
        # written as 1.000000e-05: PyYAML (YAML 1.1) reads "1e-05" as a string
        f"learner.lr={spec['lr']:.6e}", "learner.lr_schedule=constant", "learner.warmup_steps=0",
        "learner.weight_decay=0.0", "learner.grad_clip=1.0", "learner.loss_agg=grpo", "learner.beta=0.0",
        "learner.epsilon_low=0.2", "learner.epsilon_high=0.2", "learner.num_iterations=1",
        "learner.scale_adv_by_std=true", "learner.gradient_checkpointing=false", "learner.dtype=fp32",
        *([f"learner.num_threads={t}", f"rollout.num_threads={t}"] if t else []), "rollout.dtype=float32",
        "rollout.rewards=[{name: accuracy, weight: 1.0}]",
        f"trainer.mode={mode}", f"trainer.seed={spec['seed']}", f"learner.shared_prefix={str(shared_prefix).lower()}",
    ]
    return run_vlgrpo(overrides, spec["steps"], spec["warmup"])


# ------------------------------------------------------------------------------------------------
# the TRL side (runs in the TRL venv: imports nothing of Ray or DeepSpeed)
# ------------------------------------------------------------------------------------------------
def trl_worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from vlgrpo.rollout.data import DataSource, load_datasets
    from vlgrpo.rollout.rewards import RewardSet
    from vlgrpo.rollout.types import Sample

    torch.set_num_threads(spec["threads"] or os.cpu_count() or 1)
    torch.manual_seed(spec["seed"])
    data = load_datasets([DataSource(spec["data"])])
    rows = []
    for i in range(len(data)):
        s = data[i]
        rows.append({"prompt": s.prompt, "image": s.images[0], "solution": s.solution,
                     "accu_reward_method": s.accu_reward_method, "options": list(s.meta.get("options", [])),
                     "sample_id": s.sample_id})
    ds = Dataset.from_list(rows)

    prof: dict[str, float] = {}

    def add(key: str, dt: float) -> None:
        prof[key] = prof.get(key, 0.0) + dt

    def reward(name: str):
        rs = RewardSet([{"name": name}])

        def fn(prompts, completions, completion_ids, solution, accu_reward_method, options, sample_id, **_):
            t0 = time.perf_counter()
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            texts = [t if isinstance(t, str) else "".join(p.get("text") or "" for p in t) for t in texts]
            samples = [Sample(sample_id=i, prompt=[], images=[], solution=sol, accu_reward_method=m,
                              meta={"options": list(o or [])})
                       for i, sol, m, o in zip(sample_id, solution, accu_reward_method, options)]
            scores = rs.score(texts, samples, completion_lengths=[len(x) for x in completion_ids])[0][:, 0].tolist()
            add("scoring_s", time.perf_counter() - t0)
            return scores

        fn.__name__ = name
        return fn

    rows_per_step = spec["prompts"] * spec["group_size"]
    args = GRPOConfig(
        output_dir=spec["out"], use_cpu=True, bf16=False, fp16=False, seed=spec["seed"], data_seed=spec["seed"],
        max_steps=spec["warmup"] + spec["steps"], per_device_train_batch_size=rows_per_step,
        gradient_accumulation_steps=1, num_generations=spec["group_size"], max_completion_length=spec["max_tokens"],
        temperature=1.0, top_p=1.0, top_k=0, learning_rate=spec["lr"], lr_scheduler_type="constant",
        warmup_steps=0, optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        weight_decay=0.0, max_grad_norm=1.0, gradient_checkpointing=False, loss_type="grpo", beta=0.0,
        epsilon=0.2, num_iterations=1, scale_rewards="group", reward_weights=[1.0],
        logging_steps=10**6, save_strategy="no", report_to="none", disable_tqdm=True, log_completions=False,
        dataloader_num_workers=0, mask_truncated_completions=False,
    )
    model = Qwen2VLForConditionalGeneration.from_pretrained(spec["model"], dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(spec["model"])
    steps: list[dict[str, float]] = []
    holder: dict[str, Any] = {}

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            prof.clear()
            prof["_t0"] = time.perf_counter()

        def on_pre_optimizer_step(self, *a, **k):
            prof["_opt0"] = time.perf_counter()

        def on_optimizer_step(self, *a, **k):
            add("optimizer_s", time.perf_counter() - prof["_opt0"])

        def on_step_end(self, *a, **k):
            rec = {k2: v for k2, v in prof.items() if not k2.startswith("_")}
            rec["step_s"] = time.perf_counter() - prof["_t0"]
            lengths = holder["trainer"]._metrics["train"].get("completions/mean_length") or [float("nan")]
            rec["completion_tokens"] = lengths[-1] * rows_per_step
            steps.append(rec)

    trainer = GRPOTrainer(model=model, reward_funcs=[reward("accuracy")], args=args,
                          train_dataset=ds, processing_class=processor, callbacks=[Timer()])
    holder["trainer"] = trainer
    # timers around the phases (instance attributes; TRL itself is untouched)
    m = trainer.model
    in_generate = [False]

    def timed(key, fn, skip_in_generate=False):
        @functools.wraps(fn)  # keeps the signature: generate() inspects forward's parameters
        def wrapper(*a, **k):
            if skip_in_generate and in_generate[0]:
                return fn(*a, **k)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                add(key, time.perf_counter() - t0)
        return wrapper

    orig_generate = m.generate

    @functools.wraps(orig_generate)
    def generate(*a, **k):
        in_generate[0] = True
        t0 = time.perf_counter()
        try:
            return orig_generate(*a, **k)
        finally:
            in_generate[0] = False
            add("generate_s", time.perf_counter() - t0)

    m.generate = generate
    m.forward = timed("forward_s", m.forward, skip_in_generate=True)
    trainer.accelerator.backward = timed("backward_s", trainer.accelerator.backward)
    trainer._generate_and_score_completions = timed("rollout_total_s", trainer._generate_and_score_completions)
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    measured = steps[spec["warmup"]:]

    def avg(key: str) -> float:
        return sum(s.get(key, 0.0) for s in measured) / max(len(measured), 1)

    res = {key: avg(key) for key in ("step_s", "generate_s", "scoring_s", "rollout_total_s", "forward_s",
                                     "backward_s", "optimizer_s", "completion_tokens")}
    # the training forward also runs inside the rollout when TRL needs old log-probs; not here (mu = 1)
    res["rollout_other_s"] = res["rollout_total_s"] - res["generate_s"] - res["scoring_s"]
    res["train_other_s"] = res["step_s"] - res["rollout_total_s"] - res["forward_s"] - res["backward_s"] - res["optimizer_s"]
    res["steps_timed"] = len(measured)
    res["train_total_s"] = total
    res["versions"] = f"trl {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}"
    opt = trainer.optimizer
    inner = getattr(opt, "optimizer", opt)
    res["optimizer"] = f"{type(inner).__name__}(foreach={inner.defaults.get('foreach')}, fused={inner.defaults.get('fused')})"
    res["gradient_checkpointing"] = bool(getattr(trainer.model, "is_gradient_checkpointing", False))
    res["lr_scheduler"] = type(trainer.lr_scheduler).__name__ if trainer.lr_scheduler is not None else "none"
    return res


def run_trl_side(spec: dict[str, Any], trl_python: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vlgrpo-bench-trl-") as d:
        spec = dict(spec, out=str(Path(d) / "out"))
        spec_file, out_file = Path(d) / "spec.json", Path(d) / "result.json"
        spec_file.write_text(json.dumps(spec))
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
        env.pop("OMP_NUM_THREADS", None)
        proc = subprocess.run([trl_python, "-m", "vlgrpo.benchmarks.step_vs_trl", "--trl-worker", str(spec_file),
                               "--trl-out", str(out_file)], env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out_file.exists():
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
            raise RuntimeError(f"the TRL side failed (exit {proc.returncode}):\n{tail}")
        return json.loads(out_file.read_text())


# ------------------------------------------------------------------------------------------------
def run_case(args: argparse.Namespace, work: Path, size: str, px: int, modes: list[str], have_trl: bool,
             t_all: float) -> dict[str, dict]:
    """One (model size, image size) case: every vlgrpo mode, then TRL; prints its table."""
    model, data, n_params = prepare(size, work, n_data=256, image_size=px)
    spec = {"model": model, "data": data, "prompts": args.prompts, "group_size": args.group_size,
            "max_tokens": args.max_tokens, "lr": args.lr, "threads": args.threads, "steps": args.steps,
            "warmup": args.warmup, "seed": 0}
    n_prompt = prompt_tokens(model, data)
    threads = f"{args.threads} torch thread(s) per process" if args.threads else (
        f"equal cores ({os.cpu_count()}): TRL {os.cpu_count()} threads, vlgrpo its allotment")
    print(f"\n== size {size}: qwen2-vl, {n_params / 1e6:.2f}M params; {args.prompts} prompts x {args.group_size} "
          f"completions, max {args.max_tokens} tokens, {n_prompt}-token prompts; {threads}; "
          f"learner.shared_prefix {args.shared_prefix}", flush=True)
    res: dict[str, dict] = {}
    variants = {"on": [True], "off": [False], "both": [True, False]}[args.shared_prefix]
    for mode in modes:
        for shared in variants:
            label = f"vlgrpo {mode}" + (" per-row" if not shared and len(variants) > 1 else "")
            res[label] = run_vlgrpo_side(spec, mode, shared)
            print(f"  {label}: {res[label]['step_s']:.3f} s/step, learner {res[label]['learner_step_s']:.3f} s "
                  f"({time.perf_counter() - t_all:.0f}s so far)", flush=True)
    if have_trl:
        res["TRL"] = run_trl_side(spec, args.trl_python)
        print(f"  TRL: {res['TRL']['step_s']:.3f} s/step ({res['TRL']['versions']}; optimizer "
              f"{res['TRL']['optimizer']}, gradient checkpointing {res['TRL']['gradient_checkpointing']}, "
              f"scheduler {res['TRL']['lr_scheduler']}) ({time.perf_counter() - t_all:.0f}s so far)", flush=True)
    cols = list(res)
    rows = []
    for label, vk, tk in PHASES:
        row = [label]
        for c in cols:
            key = tk if c == "TRL" else vk
            row.append(res[c].get(key, float("nan")) if key else float("nan"))
        rows.append(row)
    rows.append(["steps/s"] + [1.0 / res[c]["step_s"] for c in cols])
    rows.append(["completion tokens / step"] + [res[c].get("completion_tokens", float("nan")) for c in cols])
    rows_n = args.prompts * args.group_size
    learner_s = {c: res[c]["learner_step_s"] if c != "TRL" else
                 res[c]["forward_s"] + res[c]["backward_s"] + res[c]["optimizer_s"] for c in cols}
    rows.append(["learner tokens/s (prompt + completion, per row)"] + [
        (rows_n * n_prompt + res[c].get("completion_tokens", 0.0)) / max(learner_s[c], 1e-9) for c in cols])
    print(table(["phase (mean s per step)"] + cols, rows,
                title=f"size {size} ({n_params / 1e6:.2f}M params, {px} px images): mean over {args.steps} steps after "
                      f"{args.warmup} warm-up; '-' = no such phase on that side"), flush=True)
    print(f"  the shared prefix saves {args.prompts * (args.group_size - 1) * n_prompt} prompt tokens a step in the "
          f"learner and as many in the transformers engine ({args.prompts} prompt passes instead of {rows_n})")
    return res


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="both", choices=["micro", "tiny", "small", "both"],
                    help="tiny-model preset; both = micro then small")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per side and mode")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--image-size", type=int, default=56,
                    help="image side in pixels: 56 = 4 image tokens a prompt; 420 = 225 (a long, VLM-like prompt)")
    ap.add_argument("--long-image-size", type=int, default=420, help="the long-prompt case at the largest size "
                    "(420 px = 225 image tokens); 0: skip it")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per process on both sides; 0: equal "
                    "cores, TRL all of them, vlgrpo its own allotment")
    ap.add_argument("--modes", default="sync,async", help="vlgrpo modes to run")
    ap.add_argument("--shared-prefix", default="on", choices=["on", "off", "both"],
                    help="learner.shared_prefix of the vlgrpo runs; both: each mode also per-row")
    ap.add_argument("--trl-python", default=os.environ.get("VLGRPO_TRL_PYTHON", str(ROOT / ".venv-trl" / "bin" / "python")))
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--trl-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--trl-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.trl_worker:  # inside the TRL venv
        spec = json.loads(Path(args.trl_worker).read_text())
        Path(args.trl_out).write_text(json.dumps(trl_worker(spec)))
        return

    print(f"machine: {machine()}", flush=True)
    tmp = tempfile.TemporaryDirectory(prefix="vlgrpo-bench-")
    work = Path(args.workdir or tmp.name)
    sizes = ["micro", "small"] if args.size == "both" else [args.size]
    modes = [m for m in args.modes.split(",") if m]
    have_trl = not args.skip_trl and Path(args.trl_python).exists()
    if not args.skip_trl and not have_trl:
        print(f"NOTE: no TRL environment at {args.trl_python}; run `bash benchmarks/setup_trl_env.sh` first "
              "(measuring the vlgrpo side only)", flush=True)
    t_all = time.perf_counter()
    cases = [(size, args.image_size) for size in sizes] + [(sizes[-1], args.long_image_size)] * (args.long_image_size > 0)
    ratios: dict[tuple[str, int], dict[str, float]] = {}
    head, results = (sizes[-1], args.image_size), {}
    for size, px in cases:
        res = results[size, px] = run_case(args, work, size, px, modes, have_trl, t_all)
        if "TRL" in res:
            ratios[size, px] = {m: res["TRL"]["step_s"] / res[f"vlgrpo {m}"]["step_s"] for m in modes}
            print("  vlgrpo steps/s / TRL steps/s: " + ", ".join(f"{m} {v:.3f}" for m, v in ratios[size, px].items()),
                  flush=True)
    tmp.cleanup()
    if not ratios:
        print("\nTRL was not run: no ratio. RESULT shows the vlgrpo sync steps/s instead.")
        result(f"vlgrpo_{modes[0]}_steps_per_s_no_trl", 1.0 / results[head][f"vlgrpo {modes[0]}"]["step_s"])
        return
    print()
    for (size, px), r in ratios.items():
        print(f"size {size}, {px} px images: vlgrpo/TRL steps/s = " + ", ".join(f"{m} {v:.3f}" for m, v in r.items())
              + f" (best {max(r.values()):.3f})")
    mode = max(ratios[head], key=ratios[head].get)  # vlgrpo's best mode
    result(f"step_vs_trl_{head[0]}_vlgrpo_{mode}_over_trl", ratios[head][mode])


if __name__ == "__main__":
    from vlgrpo.benchmarks.step_vs_trl import main as _main

    _main()
