"""Weight sync: the package's two transports from one Ray actor (the learner's place) to 1 and 2
receiver actors (rollout workers' place), against the floor (an in-process ``copy_`` of the same
tensors) and a naive per-tensor ``ray.put`` / ``ray.get``.

    python -m vlgrpo.benchmarks.weight_sync                      # 50 and 500 MB, 1 and 2 receivers
    python -m vlgrpo.benchmarks.weight_sync --sizes-mb 50 --receivers 1 --reps 5

What is timed (every method once untimed, then ``--reps`` rounds in which every method runs once,
round-robin, so that load from other processes hits all methods alike; best and median reported;
wall time seen by the driver, as the controller's ``sync/seconds``, except the floors):

* ``floor``: ``dst.copy_(src)`` for every tensor in one process (the driver; torch's default
  threads), and the same inside an actor (Ray gives actors one torch thread), timed inside the
  process. The faster of the two is the floor.
* ``shared memory, weights live there``: what ``sync.transport=auto`` does for workers on the
  learner's node. The sender's tensors live in its :class:`SharedRegion` (``SharedRegion.adopt``,
  as ``SyncedLearner.share_weights`` does with rank 0's ZeRO-1/2 flat buffers or stage-0
  parameters); each receiver's ``receive_weights`` yields views of the region at once and the
  receiver ``copy_``-s them into its own parameters (what ``TransformersEngine.load_weights``
  does): one copy in all, then the end-of-sync barrier.
* ``shared memory, staged by the source``: the same transport for tensors that do not live in the
  region (frozen ones, ZeRO-3 gathers): ``send_weights`` copies each bucket in and signals it, the
  receivers copy it out, pipelined bucket by bucket.
* ``broadcast, B MB buckets``: the gloo broadcast used for workers on other nodes (and with
  ``sync.transport=broadcast``), with the same receiver-side ``copy_``.
* ``naive ray.put/get``: the sender ``ray.put``-s every tensor, each receiver ``ray.get``-s all
  the refs and copies them into its parameters.

No checksums (``verify=False``; the controller's default ``sync.verify=true`` adds a blake2b pass
per bucket on both sides); the received bytes are checked once per configuration outside the
timing. MB = 2**20 bytes. The headline (last line) is the best "weights live there" MB/s divided by
the floor MB/s at the largest size with 1 receiver (500 MB by default): the throughput a real model
(>= 1 GB) sees; at 50 MB a fixed ~4 ms per sync (Ray calls, the end-of-sync barrier) weighs against
a 5 ms floor, and the table shows it.
"""
from __future__ import annotations

import argparse
import gc
import os
import time
from typing import Optional

import torch

from ._common import init_ray, machine, median, result, table

MiB = 2**20


# ------------------------------------------------------------------------------------------------
# tensors of realistic shapes
# ------------------------------------------------------------------------------------------------
def model_shapes(total_mb: float) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a Qwen-like decoder totalling ~``total_mb`` MB of fp32: per layer
    q/k/v (with bias, GQA 4:1), o, gate/up/down and two norms; embedding and lm_head sized to fill
    the remainder. ~50 MB -> hidden 512 (about 50 tensors), ~500 MB -> hidden 1024 (about 130)."""
    total = int(total_mb * MiB) // 4  # elements
    h = 512 if total_mb < 200 else 1024
    inter = (int(h * 2.75) // 64) * 64
    kv = h // 4
    layer = [("q_proj.weight", (h, h)), ("q_proj.bias", (h,)), ("k_proj.weight", (kv, h)), ("k_proj.bias", (kv,)),
             ("v_proj.weight", (kv, h)), ("v_proj.bias", (kv,)), ("o_proj.weight", (h, h)),
             ("gate_proj.weight", (inter, h)), ("up_proj.weight", (inter, h)), ("down_proj.weight", (h, inter)),
             ("input_layernorm.weight", (h,)), ("post_attention_layernorm.weight", (h,))]
    per_layer = sum(_numel(s) for _, s in layer)
    min_vocab = 4096
    n_layers = max(1, (total - 2 * min_vocab * h) // per_layer)
    vocab = max(min_vocab, (total - n_layers * per_layer - h) // (2 * h))
    shapes = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(n_layers):
        shapes += [(f"model.layers.{i}.{n}", s) for n, s in layer]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]
    return shapes


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def make_tensors(shapes, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(s, generator=g) for n, s in shapes}


def fingerprint(tensors: dict[str, torch.Tensor]) -> float:
    return float(sum(t.double().sum() * (i + 1) for i, t in enumerate(tensors.values())))


# ------------------------------------------------------------------------------------------------
# the actors
# ------------------------------------------------------------------------------------------------
class Member:
    """Sender (rank 0) or receiver (rank >= 1) of the weight-sync groups; holds its own tensors."""

    def __init__(self, shapes, seed: int) -> None:
        torch.set_num_threads(1)
        self.tensors = make_tensors(shapes, seed)
        self.groups: dict = {}  # key -> SyncGroup
        self.regions: dict = {}  # key -> SharedRegion (sender)

    def ready(self) -> int:
        return os.getpid()

    def share(self, key: str, placed: bool):
        """Sender: a shared region for the same-node transport; ``placed``: move this member's
        tensors into it, as ``SyncedLearner.share_weights`` does with a learner's weights.
        Returns (handle, {name: offset} of placed tensors)."""
        from vlgrpo.cluster.weight_sync import SharedRegion, packed_bytes

        region = SharedRegion(packed_bytes(self.specs()))
        self.regions[key] = region
        return region.handle, ({n: region.adopt(t) for n, t in self.tensors.items()} if placed else {})

    def join(self, key: str, info, rank: int) -> bool:
        from vlgrpo.cluster.weight_sync import SyncGroup

        self.groups[key] = SyncGroup(info, rank, self.regions.get(key))
        return True

    def leave(self) -> None:
        for g in self.groups.values():
            g.close()
        self.groups.clear()
        for r in self.regions.values():
            r.close()
        self.regions.clear()

    def specs(self):
        from vlgrpo.cluster.weight_sync import spec_of

        return [spec_of(n, t) for n, t in self.tensors.items()]

    def fingerprint(self) -> float:
        return fingerprint(self.tensors)

    def scramble(self) -> None:
        """New random values (so that a method's check cannot pass on an earlier method's bytes)."""
        for t in self.tensors.values():
            t.uniform_()

    # -- the package's transports -------------------------------------------------------------------
    def send(self, key: str, plan) -> float:
        from vlgrpo.cluster.weight_sync import send_weights

        return send_weights(self.groups[key], plan, self.tensors.items()).seconds

    def receive(self, key: str, plan) -> int:
        from vlgrpo.cluster.weight_sync import receive_weights

        n = 0
        for name, t in receive_weights(self.groups[key], plan):
            self.tensors[name].copy_(t)
            n += 1
        return n

    # -- naive per-tensor object store ------------------------------------------------------------
    def put_all(self) -> list:
        import ray

        return [[ray.put(t) for t in self.tensors.values()]]  # nested: the driver passes refs on as refs

    def get_all(self, wrapped: list) -> int:
        import ray

        got = ray.get(wrapped[0])
        for dst, t in zip(self.tensors.values(), got):
            dst.copy_(t)
        del got
        return len(wrapped[0])

    # -- floor measured inside an actor (one torch thread) ----------------------------------------
    def copy_once(self) -> float:
        if getattr(self, "_dst", None) is None:
            self._dst = {n: torch.empty_like(t) for n, t in self.tensors.items()}
        t0 = time.perf_counter()
        for n, t in self.tensors.items():
            self._dst[n].copy_(t)
        return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------
# the benchmark
# ------------------------------------------------------------------------------------------------
def driver_copy(shapes):
    """The floor in this process: returns a function timing one ``copy_`` pass over all tensors."""
    src = make_tensors(shapes, 1)
    dst = {n: torch.empty_like(t) for n, t in src.items()}

    def run() -> float:
        t0 = time.perf_counter()
        for n, t in src.items():
            dst[n].copy_(t)
        return time.perf_counter() - t0

    return run


def wall(fn):
    def run() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return run


def run_case(size_mb: float, n_recv: int, buckets: list[float], shm_buckets: list[float], reps: int,
             naive: bool, rows: list, summary: dict) -> None:
    """All methods for one (payload, receivers) case, measured round-robin (rep 1 of every method,
    then rep 2, ...) so that load from other processes hits them alike; best and median reported."""
    import ray

    from vlgrpo.cluster.placement import get_free_port
    from vlgrpo.cluster.weight_sync import SyncGroupInfo, TensorSpec, make_plan

    shapes = model_shapes(size_mb)
    nbytes = 4 * sum(_numel(s) for _, s in shapes)
    mb = nbytes / MiB
    cls = ray.remote(num_cpus=0)(Member)
    sender = cls.remote(shapes, 0)  # private tensors: broadcast, staged shared memory, ray.put
    placed = cls.remote(shapes, 0)  # tensors living in its shared region, as a ZeRO-1/2 or stage-0 learner's
    receivers = [cls.remote(shapes, 100 + r) for r in range(n_recv)]
    members = [sender, placed] + receivers
    ray.get([m.ready.remote() for m in members])
    specs = ray.get(sender.specs.remote())
    want = ray.get(sender.fingerprint.remote())

    def join(key: str, src, shm: Optional[bool]) -> dict:
        """Form a group ``key`` with ``src`` as the source; shm: None (broadcast), False (staged), True (placed)."""
        handle, offsets = ray.get(src.share.remote(key, shm)) if shm is not None else (None, {})
        port = get_free_port()
        info = SyncGroupInfo("127.0.0.1", port, 1 + n_recv, "gloo", name=f"bench-{key}-{port}", timeout_s=300,
                             shm_ranks=tuple(range(1, 1 + n_recv)) if shm is not None else (), shm_handle=handle)
        ray.get([src.join.remote(key, info, 0)] + [r.join.remote(key, info, i + 1) for i, r in enumerate(receivers)])
        return offsets

    def sync(key: str, src, plan):
        return wall(lambda: ray.get([src.send.remote(key, plan)] + [r.receive.remote(key, plan) for r in receivers]))

    methods: list[tuple[str, object]] = [
        ("floor: copy_ in the driver process", driver_copy(shapes)),
        ("floor: copy_ in an actor, 1 thread", lambda: ray.get(sender.copy_once.remote())),
    ]
    offsets = join("placed", placed, True)
    placed_specs = [TensorSpec(x.name, x.shape, x.dtype, offsets[x.name], live=True) for x in specs]
    join("staged", sender, False)
    join("broadcast", sender, None)
    for b in shm_buckets:
        plan = make_plan(placed_specs, version=1, bucket_mb=b, verify=False)
        methods.append((f"shared memory, weights live there, {b:g} MB buckets ({len(plan.buckets)}, no signals)",
                        sync("placed", placed, plan)))
    for b in shm_buckets:
        plan = make_plan(specs, version=1, bucket_mb=b, verify=False)
        methods.append((f"shared memory, staged by the source, {b:g} MB buckets", sync("staged", sender, plan)))
    for b in buckets:
        plan = make_plan(specs, version=1, bucket_mb=b, verify=False)
        methods.append((f"broadcast (gloo), {b:g} MB buckets ({len(plan.buckets)} broadcasts)",
                        sync("broadcast", sender, plan)))
    if naive:
        def put_get():
            wrapped = sender.put_all.remote()
            ray.get([r.get_all.remote(wrapped) for r in receivers])

        methods.append(("naive per-tensor ray.put / ray.get", wall(put_get)))

    times: dict[str, list[float]] = {name: [] for name, _ in methods}
    try:
        for name, fn in methods:  # warm-up: first touch of buffers, gloo connections, object store
            if not name.startswith("floor"):
                ray.get([r.scramble.remote() for r in receivers])
            fn()
            if not name.startswith("floor"):
                got = ray.get([r.fingerprint.remote() for r in receivers])
                if any(abs(g - want) > 1e-6 * abs(want) for g in got):
                    raise RuntimeError(f"{name}: the receivers got different bytes than sent")
        for _ in range(reps):
            for name, fn in methods:
                times[name].append(fn())
    finally:
        ray.get([m.leave.remote() for m in members])
        for m in members:
            ray.kill(m)
        methods.clear()
        gc.collect()
        time.sleep(0.5)  # let the killed actors' memory go before the next case

    floor_s = min(min(times[n]) for n in times if n.startswith("floor"))  # the faster floor
    label = f"{mb:.0f} MB x{len(shapes)}"
    best = {"shared memory, weights live": 0.0, "shared memory, staged": 0.0, "broadcast": 0.0}
    for name, ts in times.items():
        rows.append([label, n_recv, name, min(ts) * 1e3, median(ts) * 1e3, mb / min(ts), floor_s / min(ts)])
        for k in best:
            if name.startswith(k):
                best[k] = max(best[k], floor_s / min(ts))
    best = dict(zip(("placed", "staged", "broadcast"), best.values()))
    summary[(size_mb, n_recv)] = {"floor_mb_s": mb / floor_s, **{f"{k}_x_floor": v for k, v in best.items()}}


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", default="50,500", help="comma-separated payload sizes (MB of fp32)")
    ap.add_argument("--receivers", default="1,2", help="comma-separated receiver counts")
    ap.add_argument("--shm-buckets-mb", default="4,16,64", help="bucket sizes to sweep for shared memory")
    ap.add_argument("--buckets-mb", default="1,16,64", help="bucket sizes to sweep for the gloo broadcast")
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions of every method (best and median shown)")
    ap.add_argument("--no-naive", action="store_true", help="skip the ray.put/get baseline")
    args = ap.parse_args(argv)
    sizes = [float(x) for x in args.sizes_mb.split(",")]
    recvs = sorted(int(x) for x in args.receivers.split(","))
    buckets = [float(x) for x in args.buckets_mb.split(",") if x]
    shm_buckets = [float(x) for x in args.shm_buckets_mb.split(",") if x]

    print(f"machine: {machine()}", flush=True)
    init_ray(1 + max(recvs))
    rows: list = []
    summary: dict = {}
    t_all = time.perf_counter()
    for size in sizes:
        for n in recvs:
            run_case(size, n, buckets, shm_buckets, args.reps, naive=not args.no_naive, rows=rows, summary=summary)
            print(f"  done: {size:g} MB, {n} receiver(s) ({time.perf_counter() - t_all:.0f}s)", flush=True)
    print(table(["payload", "receivers", "method", "best ms", "median ms", "MB/s (best)", "x floor"], rows,
                title=f"weight sync, {args.reps} reps round-robin (MB/s = payload MB / wall s; every receiver gets "
                      "the whole payload; x floor = floor s / method s, floor = the faster copy_ row)"))
    print()
    for (size, n), v in summary.items():
        print(f"{size:g} MB, {n} receiver(s), best of each transport as a share of the floor "
              f"({v['floor_mb_s']:,.0f} MB/s): shared memory with the weights living there {v['placed_x_floor']:.1%}, "
              f"shared memory staged by the source {v['staged_x_floor']:.1%}, gloo broadcast {v['broadcast_x_floor']:.1%}")
    key = (sizes[-1], recvs[0])
    if shm_buckets:
        result(f"weight_sync_shm_over_floor_{sizes[-1]:g}MB_{recvs[0]}recv", summary[key]["placed_x_floor"])
    else:
        result(f"weight_sync_broadcast_over_floor_{sizes[-1]:g}MB_{recvs[0]}recv", summary[key]["broadcast_x_floor"])


if __name__ == "__main__":
    from vlgrpo.benchmarks.weight_sync import main as _main

    _main()
