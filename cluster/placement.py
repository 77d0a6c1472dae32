"""Placement: where every actor goes and how each rollout worker gets its weights, as a pure function of the config
and a cluster description (``vlgrpo plan``). Design: docs/design.md#placement."""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Optional

import ray
from ray.util.placement_group import placement_group as make_pg
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .config import ConfigError

COLOCATED_SHARE = 0.5  # of a colocated bundle's GPU, taken by each of the learner rank and the worker (a Ray token)


class PlacementError(ConfigError):
    """A layout the cluster cannot host or the weight sync cannot serve; the message names the fix."""


@dataclass(frozen=True)
class Node:
    cpus: float  # 0: not described (no CPU check)
    gpus: int


@dataclass
class ActorPlan:
    role: str  # "learner 0", "worker 1"
    group: str  # its placement group
    bundle: int
    cpus: float
    gpus: float  # the actor's own share (num_gpus)
    node: int = -1
    gpu_ids: tuple[int, ...] = ()
    transport: str = ""  # rollout workers: shm | ipc | broadcast


@dataclass
class Layout:
    backend: str  # the sync group's: nccl | gloo
    engine_processes: str  # how each vLLM engine runs its workers
    colocated: bool = False
    groups: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    actors: list[ActorPlan] = field(default_factory=list)

    def of(self, role: str) -> ActorPlan:
        return next(a for a in self.actors if a.role == role)

    def text(self) -> str:
        g = self.groups["learners"]
        lines = [f"weight-sync backend: {self.backend}; vLLM engines: {self.engine_processes}",
                 f"placement: learners {len(g)} x {json.dumps(g[0])} (PACK); " + ("rollout workers in the learners' "
                 "bundles (colocated)" if self.colocated else "each rollout worker its own group"), "actors:"]
        lines += [f"  {a.role:<10} group {a.group}[{a.bundle}]  cpus {a.cpus:g} gpus {a.gpus:g}  node {a.node} "
                  f"gpus {list(a.gpu_ids)}" + (f"  sync: {a.transport}" if a.transport else "") for a in self.actors]
        return "\n".join(lines)


def transport(setting: str, backend: str, worker: tuple[Any, tuple], source: tuple[Any, tuple],
              who: str = "a rollout worker") -> str:
    """How a rollout worker at ``(node, gpu ids)`` gets the weights of learner rank 0 at ``source``: ``ipc`` (CUDA
    IPC: it shares rank 0's GPU, where NCCL cannot reach it), ``shm`` (same node, CPU weights, gloo; unless
    ``sync.transport=broadcast``), else the ``broadcast``. With ``sync.transport=shm`` all but ``shm`` is an error."""
    same_node = worker[0] == source[0]
    if same_node and set(worker[1]) & set(source[1]):
        how = "ipc"
    else:
        how = "shm" if same_node and not source[1] and backend == "gloo" and setting != "broadcast" else "broadcast"
    if setting == "shm" and how != "shm":
        raise PlacementError(f"sync.transport=shm but {who} at {worker} cannot read learner 0's weights from shared "
                             f"memory at {source} (another node, or GPU weights); use sync.transport=auto")
    return how


def check_sync_devices(backend: str, members: list[tuple[str, Any, tuple]]) -> None:
    """NCCL refuses two ranks of one group on one GPU: every broadcast member ``(role, node, gpu ids)``
    needs its own."""
    if backend != "nccl":
        return
    seen: dict[tuple, str] = {}
    for role, node, gpus in members:
        for g in gpus:
            if (node, g) in seen:
                raise PlacementError(f"{role} and {seen[node, g]} would share GPU {g} on node {node} in the NCCL "
                                     "weight-sync group, which NCCL refuses; give each whole GPUs or set "
                                     "rollout.colocate=true (CUDA IPC on a shared GPU)")
            seen[node, g] = role


def plan_layout(cfg, nodes: list[Node]) -> Layout:
    """Bundles, actors and transports for ``cfg`` on ``nodes`` (see the module docstring)."""
    r, lr = cfg.rollout, cfg.learner
    has_gpus = any(n.gpus for n in nodes)
    backend = cfg.sync.backend if cfg.sync.backend != "auto" else ("nccl" if has_gpus else "gloo")
    lg = (1.0 if has_gpus else 0.0) if lr.gpus_per_rank < 0 else float(lr.gpus_per_rank)
    wg = (float(r.tensor_parallel_size) if has_gpus else 0.0) if r.gpus_per_worker < 0 else float(r.gpus_per_worker)
    colocate = r.colocate and has_gpus
    if colocate:
        if r.tensor_parallel_size != 1 or lg != 1 or wg not in (0, 1):
            raise PlacementError("rollout.colocate puts one TP-1 engine on each learner rank's GPU: set "
                                 "rollout.tensor_parallel_size=1 and leave learner.gpus_per_rank / rollout.gpus_per_worker at -1")
        if r.num_workers > lr.num_ranks:
            raise PlacementError(f"rollout.colocate: {r.num_workers} rollout workers but {lr.num_ranks} learner GPUs "
                                 "to share; set rollout.num_workers <= learner.num_ranks")
    if backend == "nccl" and not has_gpus:
        raise PlacementError("sync.backend=nccl but the cluster has no GPUs; use sync.backend=auto")
    free_cpu = [n.cpus or float("inf") for n in nodes]
    free_gpu = [list(range(n.gpus)) for n in nodes]
    layout = Layout(backend, colocated=colocate, engine_processes=("multiprocess (mp executor" + (f", TP {r.tensor_parallel_size})" if
                    r.tensor_parallel_size > 1 else ")")) if has_gpus else "in the worker process")

    def place(group: str, bundles: list[dict[str, float]]) -> list[tuple[int, tuple]]:
        """Each bundle on the first node with room (as Ray's PACK fills nodes)."""
        layout.groups[group], out = bundles, []
        for b in bundles:
            node = next((k for k in range(len(nodes)) if free_cpu[k] >= b["CPU"] and len(free_gpu[k]) >= b["GPU"]), -1)
            if node < 0:
                raise PlacementError(f"the cluster ({len(nodes)} node(s): {[(n.cpus, n.gpus) for n in nodes]} CPUs, GPUs) "
                                     f"cannot place {group} bundle {b}: lower learner.num_ranks / rollout.num_workers, "
                                     "the GPUs or CPUs per actor, or add nodes")
            free_cpu[node] -= b["CPU"]
            gpus, free_gpu[node] = tuple(free_gpu[node][:int(b["GPU"])]), free_gpu[node][int(b["GPU"]):]
            out.append((node, gpus))
        return out

    share = COLOCATED_SHARE if colocate else 1.0
    lbundle = {"CPU": lr.cpus_per_rank + (r.cpus_per_worker if colocate else 0), "GPU": lg}
    for i, (node, gpus) in enumerate(place("learners", [lbundle] * lr.num_ranks)):
        layout.actors.append(ActorPlan(f"learner {i}", "learners", i, lr.cpus_per_rank, lg * share, node, gpus))
    source = layout.actors[0]
    for i in range(r.num_workers):
        if colocate:
            ln = layout.of(f"learner {i}")
            a = ActorPlan(f"worker {i}", "learners", i, r.cpus_per_worker, share, ln.node, ln.gpu_ids)
        else:
            (node, gpus), = place(f"worker-{i}", [{"CPU": r.cpus_per_worker, "GPU": wg}])
            a = ActorPlan(f"worker {i}", f"worker-{i}", 0, r.cpus_per_worker, wg, node, gpus)
        a.transport = transport(cfg.sync.transport, backend, (a.node, a.gpu_ids), (source.node, source.gpu_ids), a.role)
        layout.actors.append(a)
    check_sync_devices(backend, [(a.role, a.node, a.gpu_ids) for a in layout.actors
                                 if a is source or a.transport == "broadcast"])
    return layout


def cluster_nodes() -> list[Node]:
    return [Node(float(n["Resources"].get("CPU", 0)), int(n["Resources"].get("GPU", 0)))
            for n in ray.nodes() if n.get("Alive")]


def node_cores() -> dict[str, int]:
    """Each live node's cores (its Ray CPUs; on the driver's node at most the cores there, as a local cluster may
    count more CPUs than it has)."""
    here = ray.util.get_node_ip_address()
    return {n["NodeManagerAddress"]: int(n["Resources"].get("CPU", 1)) if n["NodeManagerAddress"] != here else
            min(int(n["Resources"].get("CPU", 1)), os.cpu_count() or 1) for n in ray.nodes() if n.get("Alive")}


def thread_shares(mode: str, actors: list[tuple[str, str]], cores: dict[str, int],
                  fixed: dict[str, Optional[int]]) -> list[int]:
    """torch threads of each ``(kind, node)`` actor (kind ``learner`` or ``worker``). ``sync`` runs one phase at a
    time: a node's learners share all its cores while they train, its workers while they generate. ``async``
    overlaps the phases: all actors of a node share its cores. A set ``fixed[kind]`` wins."""
    return [fixed.get(kind) or max(1, cores.get(node, 1) // sum(n == node and (mode == "async" or k == kind)
                                                                 for k, n in actors)) for kind, node in actors]


def init_ray(address: Optional[str], needed_cpus: float) -> None:
    """Connect to a running cluster (``ray job submit`` sets RAY_ADDRESS) or start a local one, on 127.0.0.1
    with at least ``needed_cpus`` logical CPUs (actors are mostly idle while others compute: oversubscribing a
    laptop's cores is intended). Every actor gets ``NCCL_CUMEM_ENABLE=0``, the value vLLM sets in its own
    processes: NCCL members of one group must agree on it."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0", "NCCL_CUMEM_ENABLE": "0"}}
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


def placement_group(bundles: list[dict[str, float]], timeout_s: float):
    """Create and wait for a PACK placement group; a clear error when the cluster cannot host it."""
    bundles = [{k: v for k, v in b.items() if v > 0} or {"CPU": 0.01} for b in bundles]
    pg = make_pg(bundles, strategy="PACK")
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        ray.util.remove_placement_group(pg)
        raise RuntimeError(f"the cluster cannot place {bundles} within {timeout_s:.0f}s; available: "
                           f"{ray.available_resources()}. Lower learner.num_ranks / rollout.num_workers or the "
                           "GPUs per actor")
    return pg


def bundle_strategy(pg, index: int) -> Any:
    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index)


def where() -> tuple[str, tuple[int, ...]]:
    """(node IP, GPU ids) of the calling actor."""
    return ray.util.get_node_ip_address(), tuple(int(g) for g in ray.get_gpu_ids())


def get_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def rendezvous(pg, index: int = 0) -> tuple[str, int]:
    """A rendezvous address (the learner group's, the weight-sync group's) on the node of bundle ``index`` of
    placement group ``pg``, where the group's rank 0 will live: that node's IP and a free port on it."""
    task = ray.remote(num_cpus=0)(lambda: (ray.util.get_node_ip_address(), get_free_port()))
    return ray.get(task.options(scheduling_strategy=bundle_strategy(pg, index)).remote())
