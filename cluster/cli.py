"""The ``vlgrpo`` command line (``vlgrpo -h``). Commands (exit status: their return, None: 0) import what they
need when run, so ``vlgrpo modules`` or a config error answers in a second, before torch, Ray or DeepSpeed load."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..rollout.synthetic import TASKS


def _cmd_modules(args) -> None:
    from ..modules import available_modules
    for key, cls in available_modules().items():
        print(f"{key}\t{cls.__module__}:{cls.__qualname__}")


def _cmd_tiny_model(args) -> None:
    from ..modules.tiny import build_tiny_model
    path = build_tiny_model(args.family, args.out_dir, seed=args.seed, size=args.size)
    meta = json.loads((path / "vlgrpo_tiny.json").read_text())
    print(json.dumps({"path": str(path), **meta}))


def _cmd_make_data(args) -> None:
    from ..rollout.synthetic import make_dataset
    from .config import TEST_SPLIT_SEED
    seed = args.seed + TEST_SPLIT_SEED * (args.split == "test")  # training builds its data with trainer.seed
    path = make_dataset(args.task, args.n, args.out_dir, seed=seed, image_size=args.image_size)
    print(json.dumps({"data": str(path), "image_folder": str(path.parent), "rows": args.n, "task": args.task,
                      "split": args.split}))


def _cmd_eval(args) -> Optional[int]:
    import yaml
    from tqdm import tqdm
    from ..modules.loading import ModelConfig
    from ..rollout.data import DataSource, load_datasets
    from ..rollout.types import SamplingConfig, concat_rollouts
    from ..rollout.worker import RolloutConfig, RolloutWorker
    from .checkpoint import resolve_checkpoint
    model, rewards = Path(args.model), [{"name": r} for r in args.rewards.split(",")] if args.rewards else None
    if not (model / "config.json").exists():  # a run or checkpoint dir: its newest policy, the run's rewards
        try:
            ckpt = resolve_checkpoint(model)
        except (FileNotFoundError, ValueError) as e:
            print(f"vlgrpo eval: --model {args.model}: {e}", file=sys.stderr)
            return 2
        run = ckpt.parent.parent / "config.yaml"
        rewards = rewards or (yaml.safe_load(run.read_text())["rollout"]["rewards"] if run.exists() else None)
        model = ckpt / "policy"
    ds = load_datasets([DataSource(args.data, args.image_folder)])
    worker = RolloutWorker(RolloutConfig(engine=args.engine, rewards=rewards or [{"name": "accuracy"}], num_threads=0),
                           ModelConfig(path=str(model), module=args.module))
    sampling = SamplingConfig(n=args.num_generations, temperature=args.temperature, max_tokens=args.max_tokens,
                              seed=args.seed)
    rows = [r for r in (ds.get(i) for i in range(len(ds))) if r is not None]  # images that fail are counted
    starts = tqdm(range(0, len(rows), args.batch_size), desc="eval", disable=not sys.stderr.isatty())
    batch = concat_rollouts([worker.generate(rows[s:s + args.batch_size], sampling) for s in starts])
    summary = {"model": str(model), "rows": len(rows), "skipped": ds.num_skipped, "completions": batch.rewards.shape[0],
               "reward/mean": float(batch.total_rewards().mean()), "reward_errors": sum(batch.reward_errors.values()),
               **{f"reward/{n}": float(batch.rewards[:, j].mean()) for j, n in enumerate(batch.reward_names)}}
    if args.completions:  # one line per completion: what the model said, and what it scored
        by_id = {r.sample_id: r for r in rows}
        with open(args.completions, "w") as f:
            for i, text in enumerate(batch.completions_text):
                sample = by_id[batch.sample_ids[i // batch.group_size]]
                f.write(json.dumps({"id": sample.sample_id, "prompt": batch.prompts_text[i // batch.group_size],
                                    "images": sample.meta.get("image_paths", []), "video": sample.meta.get("video"),
                                    "completion": text,
                                    "rewards": dict(zip(batch.reward_names, batch.rewards[i].tolist()))}) + "\n")
    print(json.dumps(summary))


def _cmd_config(args) -> None:
    from .config import describe, load_config
    print(describe(load_config(args.config, args.overrides)), end="")


def _cmd_plan(args) -> None:
    from .config import load_config
    from .placement import Node, plan_layout
    cfg = load_config(args.config, args.overrides, here=False)  # for a cluster: its files and vLLM need not be here
    print(plan_layout(cfg, [Node(args.cpus_per_node, args.gpus_per_node)] * args.nodes).text())


def _cmd_train(args) -> None:
    from .config import ConfigError, load_config
    from .controller import train
    if args.resume and not args.config:  # continue the run it names: its own config, overrides on top
        saved = Path(args.resume) / "config.yaml"
        if not saved.exists():
            raise ConfigError(f"--resume {args.resume}: no config.yaml there; name the output_dir of a "
                              "vlgrpo run (or also pass --config)")
        cfg = load_config(saved, [f"trainer.output_dir={args.resume}", *args.overrides], saved=True)
    else:
        cfg = load_config(args.config, args.overrides)
    history = train(cfg, resume=args.resume)
    last = history[-1] if history else {}
    print(json.dumps({"output_dir": cfg.trainer.output_dir, "steps": last.get("step"),
                      "reward/accuracy": last.get("reward/accuracy"), "reward/mean": last.get("reward/mean")}))


def _cmd_scale(args) -> None:
    from .control import request_scale
    path = request_scale(args.output_dir, args.rollout_workers)
    print(json.dumps({"request": str(path), "rollout_workers": args.rollout_workers}))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlgrpo", description="GRPO for vision-language models on Ray")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a policy (no --config: tiny model on a synthetic task, on CPU)")
    t.add_argument("--resume", help="output dir or checkpoint dir to continue from")
    g = sub.add_parser("config", help="print every config option with its value and help (YAML for --config)")
    n = sub.add_parser("plan", help="print where every actor goes and how weights reach each worker, for a described "
                                    "cluster (no Ray, no GPU needed); a layout that cannot run fails here")
    n.add_argument("--nodes", type=int, default=1, help="nodes in the cluster")
    n.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node")
    n.add_argument("--cpus-per-node", type=float, default=0, help="CPUs per node (0: do not check CPUs)")
    for x, fn in ((t, _cmd_train), (g, _cmd_config), (n, _cmd_plan)):
        x.add_argument("--config", help="YAML config (see examples/); omitted: the embedded default")
        x.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.num_workers=4 learner.lr=1e-6")
        x.set_defaults(fn=fn)
    e = sub.add_parser("eval", help="roll out over a dataset with the configured rewards; prints one JSON line")
    e.add_argument("--model", required=True, help="a model dir, or a run / checkpoint dir (its newest policy)")
    e.add_argument("--data", required=True, help="VLM-R1 JSONL file")
    e.add_argument("--image-folder", default=None, help="folder the image paths are relative to (default: the file's)")
    e.add_argument("--engine", default="auto", choices=["auto", "transformers", "vllm"], help="auto: vllm if on GPU")
    e.add_argument("--module", default="auto", help="VLM module key (vlgrpo modules), or auto from config.json")
    e.add_argument("--num-generations", type=int, default=1, help="completions per prompt")
    e.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0: greedy")
    e.add_argument("--max-tokens", type=int, default=64, help="most tokens per completion")
    e.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    e.add_argument("--rewards", help="comma-separated reward names (default: the run's rewards, else accuracy)")
    e.add_argument("--completions", help="write every completion with its prompt, images and rewards (JSONL)")
    e.add_argument("--seed", type=int, default=0, help="sampling seed")
    e.set_defaults(fn=_cmd_eval)
    d = sub.add_parser("make-data", help="write a synthetic visual task as VLM-R1 JSONL + images")
    d.add_argument("--task", default="color", choices=sorted(TASKS), help="which synthetic task (see README)")
    d.add_argument("--n", type=int, default=256, help="number of rows")
    d.add_argument("--seed", type=int, default=0, help="the run's trainer.seed (train: the same rows as the run)")
    d.add_argument("--split", default="train", choices=["train", "test"], help="test: held out from a run's data")
    d.add_argument("--image-size", type=int, default=56, help="image side in pixels")
    d.add_argument("out_dir", help="folder for data.jsonl and images/")
    d.set_defaults(fn=_cmd_make_data)
    m = sub.add_parser("tiny-model", help="build a tiny random VLM (+ processor) and save_pretrained it")
    m.add_argument("--family", required=True, choices=["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "internvl"], help="model")
    m.add_argument("--size", default="tiny", choices=["micro", "tiny", "small"], help="width and depth preset")
    m.add_argument("--seed", type=int, default=0, help="initialisation seed")
    m.add_argument("out_dir", help="folder to save the model and processor in")
    m.set_defaults(fn=_cmd_tiny_model)
    c = sub.add_parser("scale", help="ask a running job to change its number of rollout workers (between steps)")
    c.add_argument("--output-dir", required=True, help="trainer.output_dir of the running job")
    c.add_argument("--rollout-workers", type=int, required=True, help="the number of rollout workers wanted")
    c.set_defaults(fn=_cmd_scale)
    s = sub.add_parser("modules", help="list registered VLM modules (key and class)")
    s.set_defaults(fn=_cmd_modules)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except Exception as e:
        from .config import ConfigError  # loaded by then when it is one (commands import what they need)
        if not isinstance(e, ConfigError):
            raise
        print(f"vlgrpo: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
