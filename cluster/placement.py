"""Ray start-up and placement: learner ranks in one placement group, each rollout worker in its own
(so workers can be added and removed while the run goes on). GPU bundles where the cluster has
GPUs, CPU bundles otherwise."""
from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, Optional

import ray
from ray.util.placement_group import placement_group as make_pg
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

log = logging.getLogger("vlgrpo")


def init_ray(address: Optional[str], needed_cpus: float) -> None:
    """Connect to a running cluster (``ray job submit`` sets RAY_ADDRESS) or start a local one.

    A local one binds to 127.0.0.1 and gets at least ``needed_cpus`` logical CPUs (actors are
    mostly idle while others compute, so oversubscribing a laptop's cores is intended)."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}}
    if address:
        # Under `ray job submit` the job's runtime_env is merged with ours; a key set in both is
        # a conflict that fails the job, so the job's own env_vars win.
        job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env") or {}
        env["env_vars"] = {k: v for k, v in env["env_vars"].items() if k not in (job_env.get("env_vars") or {})}
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster on 127.0.0.1
    ray.init(num_cpus=max(int(needed_cpus + 0.999), os.cpu_count() or 1), include_dashboard=False,
             _node_ip_address="127.0.0.1", runtime_env=env, log_to_driver=True)


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0))


@dataclass
class Resources:
    cpus: float
    gpus: float


def learner_resources(cfg, has_gpus: bool) -> Resources:
    g = cfg.learner.gpus_per_rank
    return Resources(cfg.learner.cpus_per_rank, (1.0 if has_gpus else 0.0) if g < 0 else g)


def worker_resources(cfg, has_gpus: bool) -> Resources:
    g = cfg.rollout.gpus_per_worker
    if g < 0:
        g = float(cfg.rollout.tensor_parallel_size) if has_gpus else 0.0
    return Resources(cfg.rollout.cpus_per_worker, g)


def placement_group(bundles: list[dict[str, float]], strategy: str, timeout_s: float):
    """Create and wait for a placement group; a clear error when the cluster cannot host it."""
    bundles = [{k: v for k, v in b.items() if v > 0} or {"CPU": 0.01} for b in bundles]
    pg = make_pg(bundles, strategy=strategy)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        ray.util.remove_placement_group(pg)
        raise RuntimeError(
            f"the cluster cannot place {bundles} ({strategy}) within {timeout_s:.0f}s; available: "
            f"{ray.available_resources()}. Lower learner.num_ranks / rollout.num_workers or the GPUs per actor"
        )
    return pg


def bundle_strategy(pg, index: int) -> Any:
    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index)


def bundle(res: Resources) -> dict[str, float]:
    return {"CPU": res.cpus, "GPU": res.gpus}


def get_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_ip_and_port() -> tuple[str, int]:
    """This node's IP and a free port on it: run as a Ray task where a group's rank 0 will live,
    to get a rendezvous address (the learner group's, the weight-sync group's)."""
    return ray.util.get_node_ip_address(), get_free_port()


def rendezvous(pg, index: int = 0) -> tuple[str, int]:
    """``node_ip_and_port`` on the node of bundle ``index`` of placement group ``pg``."""
    task = ray.remote(num_cpus=0)(node_ip_and_port).options(scheduling_strategy=bundle_strategy(pg, index))
    return ray.get(task.remote())
