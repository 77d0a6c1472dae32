"""The fleet: learner ranks and rollout worker slots on Ray, and the weight-sync group among them.

Everything here is bounded (``trainer.timeout_s``, ``sync.timeout_s``) and survives a rollout worker that dies or
hangs: a fresh one replaces it, first receiving the current weights, and its prompts are generated again with the
same seed (no prompt is dropped). Workers can be added and removed between steps (``scale``), also at a user's
request (``vlgrpo scale``).
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional

import ray

from ..learner.types import TrainBatch
from ..rollout.types import RolloutBatch, Sample, SamplingConfig
from . import placement
from .actors import SyncedLearner, SyncedWorker
from .config import Config
from .weight_sync import SyncGroupInfo, check_checksums, make_plan

log = logging.getLogger("vlgrpo")


class StageError(RuntimeError):
    """A stage of the step (generate, update, sync, checkpoint) failed or timed out."""


@dataclass
class WorkerSlot:
    """One rollout worker and what the driver knows of it."""

    id: int
    actor: Any
    pg: Any  # its own placement group (so workers come and go independently); None: colocated
    bundle: int = 0  # in ``pg`` (colocated: the learner group's bundle of the rank whose GPU it shares)
    node_ip: str = ""
    gpu_ids: tuple = ()
    sync_ranks: int = 1  # ranks it takes in the sync group (one per vLLM worker process)
    transport: str = "broadcast"  # placement.transport: "shm", "ipc" or "broadcast"
    has_frozen: bool = False  # received the frozen tensors (they travel once)


@dataclass
class Chunk:
    """One worker's share of a step's prompts; ``result`` once generated (retried if lost)."""

    samples: list[Sample]
    sampling: SamplingConfig
    slot: Optional[WorkerSlot] = None
    ref: Any = None
    result: Optional[RolloutBatch] = None
    retries: int = 0


class Fleet:
    learner_class: type = SyncedLearner  # what runs as an actor (benchmarks add timers by subclassing)
    worker_class: type = SyncedWorker

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.layout = placement.plan_layout(cfg, placement.cluster_nodes())  # PlacementError before any actor
        self.backend, self.colocate = self.layout.backend, self.layout.colocated
        log.info("placement:\n%s", self.layout.text())
        self.learners: list[Any] = []
        self.learner_pg: Any = None
        self.slots: list[WorkerSlot] = []
        self.sync_info: Optional[SyncGroupInfo] = None
        self.faults: Counter = Counter()
        self._next_id = 0
        self.threads: list[int] = []  # torch threads of learners + workers, as last allotted

    def get(self, refs, stage: str, timeout: Optional[float] = None):
        timeout = timeout or self.cfg.trainer.timeout_s
        try:
            return ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError as e:
            raise StageError(f"{stage}: no answer within {timeout:.0f}s (trainer.timeout_s); a worker or "
                             "collective is hung") from e
        except ray.exceptions.RayError as e:
            raise StageError(f"{stage} failed: {e}") from e

    def call(self, actors, method: str, *args, stage: str, **kwargs) -> list:
        return self.get([getattr(a, method).remote(*args, **kwargs) for a in actors], stage)

    @property
    def workers(self) -> list[Any]:
        return [s.actor for s in self.slots]

    def start_learners(self) -> None:
        n = self.cfg.learner.num_ranks
        self.learner_pg = placement.placement_group(self.layout.groups["learners"], self.cfg.trainer.timeout_s)
        addr, port = placement.rendezvous(self.learner_pg)
        plans = [self.layout.of(f"learner {r}") for r in range(n)]
        self.learners = [ray.remote(self.learner_class).options(num_cpus=a.cpus, num_gpus=a.gpus,
                                              scheduling_strategy=placement.bundle_strategy(self.learner_pg, r))
                         .remote(self.cfg.learner, self.cfg.model, r, n, addr, port) for r, a in enumerate(plans)]
        self.call(self.learners, "ping", stage="start learners")
        self.learners_at = self.call(self.learners, "where", stage="start learners")
        self.source_at = self.learners_at[0]

    def start_workers(self, n: int) -> list[WorkerSlot]:
        new = [self._start_worker() for _ in range(n)]
        for slot, h in zip(new, self.get([s.actor.health.remote() for s in new], "start rollout workers")):
            slot.node_ip, slot.gpu_ids, slot.sync_ranks = h["node_ip"], tuple(h["gpu_ids"]), h["sync_ranks"]
        return new

    def _start_worker(self) -> WorkerSlot:
        if self.colocate:  # the first learner bundle no worker uses
            pg, index = None, min(set(range(self.cfg.learner.num_ranks)) - {s.bundle for s in self.slots})
        else:
            pg, index = placement.placement_group(self.layout.groups["worker-0"], self.cfg.trainer.timeout_s), 0
        a = self.layout.of("worker 0")
        actor = ray.remote(self.worker_class).options(
            num_cpus=a.cpus, num_gpus=a.gpus, scheduling_strategy=placement.bundle_strategy(pg or self.learner_pg, index),
        ).remote(self.cfg.rollout, self.cfg.model, self._next_id, self.cfg.trainer.seed + self._next_id)
        slot = WorkerSlot(self._next_id, actor, pg, index)
        self._next_id += 1
        self.slots.append(slot)
        return slot

    def _remove(self, slot: WorkerSlot) -> None:
        self.slots.remove(slot)
        with contextlib.suppress(Exception):  # already dead
            ray.kill(slot.actor)
        if slot.pg is not None:
            ray.util.remove_placement_group(slot.pg)

    def replace(self, dead: list[WorkerSlot], version: int, sync: bool = True) -> None:
        """Swap dead workers for fresh ones, which receive the current weights (``version``) when ``sync``."""
        t0 = time.perf_counter()
        for slot in dead:
            if slot in self.slots:  # idempotent: a slot may be reported by several chunks
                self._remove(slot)
                self.faults["worker_replaced"] += 1
        self.start_workers(self.cfg.rollout.num_workers - len(self.slots))
        self.form_sync_group()
        if sync:
            self.sync(version)
        self.faults["recovery_s"] += time.perf_counter() - t0

    def scale(self, n: int, version: int) -> None:
        """Add or remove rollout workers (between steps); new ones get the current weights first."""
        if n < 1 or (self.colocate and n > self.cfg.learner.num_ranks):
            raise ValueError(f"need between 1 and {self.cfg.learner.num_ranks if self.colocate else 'any number of'} "
                             "rollout workers" + " (rollout.colocate: one per learner GPU)" * self.colocate)
        while len(self.slots) > n:
            self._remove(self.slots[-1])
        self.start_workers(n - len(self.slots))
        self.cfg.rollout.num_workers = n
        self.form_sync_group()
        self.sync(version)
        log.info("rollout workers: %d", n)

    def learners_alive(self) -> bool:
        try:
            ray.get([a.ping.remote() for a in self.learners], timeout=30)
            return True
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            return False

    def restart_learners(self) -> None:
        """Kill the learner group and start a fresh one (colocated workers, in its bundles, with it); the old
        sync group is gone with its source: the caller forms a new one."""
        with contextlib.suppress(Exception):  # members whose source died
            self.get([w.leave_sync_group.remote() for w in self.workers], "leave sync group", timeout=30)
        for a in self.learners:
            with contextlib.suppress(Exception):
                ray.kill(a)
        if self.colocate:
            for slot in list(self.slots):
                self._remove(slot)
        ray.util.remove_placement_group(self.learner_pg)
        self.sync_info, self.learners = None, []
        self.start_learners()
        self.start_workers(self.cfg.rollout.num_workers - len(self.slots))

    def dead_workers(self) -> list[WorkerSlot]:
        dead = []
        for slot in self.slots:
            try:
                ray.get(slot.actor.health.remote(), timeout=30)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError,
                    ray.exceptions.ActorUnavailableError):
                dead.append(slot)
        return dead

    def form_sync_group(self) -> None:
        """(Re)form the sync group: learner rank 0 + every worker. Called when membership changes."""
        if self.sync_info is not None:
            source = self.learners[0].leave_sync_group.remote()
            refs, gone = [(slot, slot.actor.leave_sync_group.remote()) for slot in self.slots], []
            self.get(source, "leave sync group")
            for slot, ref in refs:
                try:
                    self.get(ref, "leave sync group")
                except StageError:  # died meanwhile too (e.g. on a lost node): replace it as well
                    gone.append(slot)
            if gone:
                return self.replace(gone, 0, sync=False)  # forms the group; the caller syncs
        self.allot_threads()  # after leaving: every member answered (a 2nd dead worker is replaced above)
        addr, port = placement.rendezvous(self.learner_pg)
        first, rank = [], 1
        for slot in self.slots:  # a TP=k engine takes k consecutive ranks, from first[i]
            slot.transport = placement.transport(self.cfg.sync.transport, self.backend, (slot.node_ip, slot.gpu_ids),
                                                 self.source_at, f"rollout worker {slot.id}")
            first.append(rank)
            rank += slot.sync_ranks
        placement.check_sync_devices(self.backend, [("learner 0", *self.source_at)] + [
            (f"rollout worker {s.id}", s.node_ip, s.gpu_ids) for s in self.slots if s.transport == "broadcast"])
        local = {t: tuple(r for s, f in zip(self.slots, first) if s.transport == t for r in range(f, f + s.sync_ranks))
                 for t in ("shm", "ipc")}
        handle = self.get(self.learners[0].share_weights.remote(), "share the learner's weights") if local["shm"] else None
        self.sync_info = SyncGroupInfo(addr, port, rank, self.backend, name=f"wsync-{port}", timeout_s=self.cfg.sync.timeout_s,
                                       shm_ranks=local["shm"], shm_handle=handle, ipc_ranks=local["ipc"])
        refs = [self.learners[0].join_sync_group.remote(self.sync_info)]
        refs += [slot.actor.join_sync_group.remote(self.sync_info, f) for slot, f in zip(self.slots, first)]
        envs = self.get(refs, "form the weight-sync group")
        log.info("weight-sync group: %s", ", ".join(f"worker {s.id} on {s.node_ip} {s.transport}" for s in self.slots))
        if self.backend == "nccl" and len(set(envs)) > 1:  # NCCL members that disagree on it fail or hang in the first broadcast
            raise StageError(f"NCCL_CUMEM_ENABLE differs in the weight-sync group ({sorted(set(envs), key=str)}): set one value "
                             "for every process (vlgrpo sets 0, as vLLM does, unless the job's env_vars set it)")

    def allot_threads(self) -> None:
        """Give every actor its torch threads (``placement.thread_shares``); state them when they change."""
        actors = [("learner", ip) for ip, _ in self.learners_at] + [("worker", s.node_ip) for s in self.slots]
        cores, mode = placement.node_cores(), self.cfg.trainer.mode
        threads = placement.thread_shares(mode, actors, cores, {"learner": self.cfg.learner.num_threads,
                                                                "worker": self.cfg.rollout.num_threads})
        # every actor, every time: a replaced learner or worker is a fresh process with the same share
        self.get([a.set_threads.remote(n) for a, n in zip(self.learners + self.workers, threads)], "set threads")
        if threads != self.threads:
            self.threads = threads
            log.info("cores (%s mode: %s): %s; torch threads: learners %s, rollout workers %s", mode,
                     "each phase runs alone on all its node's cores" if mode == "sync" else "learners and workers run "
                     "at once and split their node's cores", ", ".join(f"node {ip}: {cores.get(ip, 1)} cores" for ip in
                                                                         dict.fromkeys(ip for _, ip in actors)),
                     threads[:len(self.learners)], threads[len(self.learners):])

    def sync(self, version: int, full: bool = False) -> dict[str, float]:
        """Send the learner's weights to every worker as ``version``. A worker that died meanwhile
        is replaced (the replacement gets its own sync) and the sync is repeated for everyone."""
        try:
            return self._sync(version, full)
        except StageError:
            dead = self.dead_workers()
            if not dead:
                raise
            log.warning("weight sync v%d: %d rollout worker(s) died; replacing them", version, len(dead))
            self.replace(dead, version, sync=False)
            return self._sync(version, full=True)

    def _sync(self, version: int, full: bool) -> dict[str, float]:
        """One sync; frozen tensors travel only when some worker has never received them."""
        full = full or not all(s.has_frozen for s in self.slots)
        specs = self.get(self.learners[0].weight_specs.remote(trainable_only=not full), "sync: list weights")
        plan = make_plan(specs, version, self.cfg.sync.bucket_mb, verify=self.cfg.sync.verify)
        t0 = time.perf_counter()
        refs = [a.send_weights.remote(plan) for a in self.learners] + [w.receive_weights.remote(plan) for w in self.workers]
        reports = self.get(refs, f"weight sync v{version}", timeout=self.cfg.sync.timeout_s)
        seconds = time.perf_counter() - t0
        sent, received = reports[0], reports[len(self.learners):]
        if plan.verify:
            check_checksums(sent, received)
        for r in received:
            if r.version != version:
                raise StageError(f"{r.member} reports weights v{r.version} after sync v{version}")
        for slot in self.slots:
            slot.has_frozen = True
        mb = plan.nbytes / 2**20
        return {"sync/seconds": seconds, "sync/mb": mb, "sync/staged_mb": sent.copied_bytes / 2**20,
                "sync/shm_workers": float(sum(s.transport == "shm" for s in self.slots)),
                "sync/mb_per_s": mb / max(seconds, 1e-9), "sync/tensors": float(len(plan.names)),
                "sync/full": float(full)}

    def launch(self, samples: list[Sample], sampling: list[SamplingConfig]) -> list[Chunk]:
        """Start generating ``samples`` round-robin over the workers (chunk ``i`` with ``sampling[i]``)."""
        k = len(self.slots)
        chunks = [Chunk(samples[i::k], sampling[i]) for i in range(k) if samples[i::k]]
        for chunk, slot in zip(chunks, self.slots):
            self._submit(chunk, slot)
        return chunks

    def _submit(self, chunk: Chunk, slot: WorkerSlot) -> None:
        chunk.slot, chunk.ref = slot, slot.actor.generate.remote(chunk.samples, chunk.sampling)

    def collect(self, chunks: list[Chunk], stage: str, version: int) -> list[RolloutBatch]:
        """Wait for every chunk. A worker that dies (or answers nothing within trainer.timeout_s)
        is replaced and its chunk generated again there with the same seed."""
        deadline = time.monotonic() + self.cfg.trainer.timeout_s
        while any(c.result is None for c in chunks):
            waiting = {c.ref: c for c in chunks if c.result is None}
            ready, _ = ray.wait(list(waiting), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:  # hung: treat the workers still generating as dead
                self._retry(list(waiting.values()), f"no answer within {self.cfg.trainer.timeout_s:.0f}s",
                            stage, version)
                deadline = time.monotonic() + self.cfg.trainer.timeout_s
                continue
            chunk = waiting[ready[0]]
            try:
                chunk.result = ray.get(ready[0])  # without images (rollout.worker): the driver has them already
                images = {s.sample_id: s.images for s in chunk.samples}
                chunk.result.images = [images[i] for i in chunk.result.sample_ids]
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                self._retry([chunk], type(e).__name__, stage, version)
            except ray.exceptions.RayTaskError as e:
                raise StageError(f"{stage}: rollout worker failed: {e}") from e
        return [c.result for c in chunks]

    def _retry(self, lost: list[Chunk], why: str, stage: str, version: int) -> None:
        for chunk in lost:
            if chunk.retries >= self.cfg.trainer.max_retries:
                raise StageError(f"{stage}: prompts {[s.sample_id for s in chunk.samples]} failed "
                                 f"{chunk.retries + 1} times ({why}); giving up (trainer.max_retries)")
        log.warning("%s: %d rollout worker(s) lost (%s); replacing them and retrying %d prompts", stage,
                    len({id(c.slot) for c in lost}), why, sum(len(c.samples) for c in lost))
        self.replace([c.slot for c in lost], version)
        for i, chunk in enumerate(lost):
            chunk.retries += 1
            self.faults["prompts_retried"] += len(chunk.samples)
            self._submit(chunk, self.slots[-1 - i % len(self.slots)])

    def update(self, batch: TrainBatch, stage: str) -> dict[str, float]:
        """One learner update on ``batch``, split over the ranks; rank 0's (reduced) metrics."""
        shards = batch.split(len(self.learners))
        return self.get([a.train_step.remote(s) for a, s in zip(self.learners, shards)], stage)[0]

    def shutdown(self) -> None:
        for a in self.workers + self.learners:
            with contextlib.suppress(Exception):  # already gone
                ray.kill(a)
        for pg in [s.pg for s in self.slots] + [self.learner_pg]:
            if pg is not None:
                ray.util.remove_placement_group(pg)
        self.slots, self.learners, self.learner_pg = [], [], None
