"""Weight sync: the package's two transports from one Ray actor (the learner's place) to 1 and 2
receiver actors (rollout workers' place), against the floor (an in-process ``copy_`` of the same
tensors) and a naive per-tensor ``ray.put`` / ``ray.get``.

    python -m vlgrpo.benchmarks.weight_sync                      # 50 and 500 MB, 1 and 2 receivers
    python -m vlgrpo.benchmarks.weight_sync --sizes-mb 50 --receivers 1 --reps 5
    python -m vlgrpo.benchmarks.weight_sync --cross-node only --link-gbit 1 --xn-buckets-mb 1,16,64

Cross-node (first, when run as root with iproute2; ``--cross-node off`` skips it): one network
namespace per "node" (sender, then one per receiver), each with a veth to a bridge in a switch
namespace, both directions of every veth limited to ``--link-gbit`` by ``tc qdisc tbf`` (netem
with ``--delay-ms``, where the kernel has it). Sender and receivers are plain processes started
with ``ip netns exec`` running the package's ``SyncGroup`` / ``send_weights`` /
``receive_weights`` over gloo; reported: GB/s per receiver over the link rate, and the fit of
``T = a + S ceil(log2(N+1)) / (eff R)`` (gloo's broadcast is a binomial tree of whole buffers).

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
import math
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


# ------------------------------------------------------------------------------------------------
# cross-node: plain processes in network namespaces joined by rate-limited veths
# ------------------------------------------------------------------------------------------------
XN_SUBNET = "10.232.0"  # inside the benchmark's own namespaces only
XN_IFACE = "wsn"  # each node namespace's interface towards the switch (GLOO_SOCKET_IFNAME)


def tree_rounds(n_receivers: int) -> int:
    """Rounds of gloo's binomial-tree broadcast over ``n_receivers`` + 1 members, ``ceil(log2(N+1))``:
    gloo (``gloo/broadcast.cc``) sends the whole buffer per hop, and the root posts one send per round,
    all at once, so the root's link carries the payload this many times."""
    return max(1, math.ceil(math.log2(n_receivers + 1)))


def fit_sync_model(points: list[tuple[float, int, float, float]]) -> tuple[float, float]:
    """Least-squares fit of ``T = a + S * f(N) / (eff * R)`` (f = :func:`tree_rounds`) to points
    ``(S bytes, N receivers, R bytes/s, T s)``; returns ``(a seconds, eff)``. Linear in
    ``x = S f(N) / R``: ``T = a + x / eff``."""
    xs = [s * tree_rounds(n) / r for s, n, r, _ in points]
    ts = [t for *_, t in points]
    if len(points) == 1:
        return 0.0, xs[0] / ts[0]
    mx, mt = sum(xs) / len(xs), sum(ts) / len(ts)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (t - mt) for x, t in zip(xs, ts)) / sxx
    return mt - b * mx, 1.0 / b


def predict_sync_s(size_bytes: float, n_receivers: int, rate_bytes_s: float, a: float, eff: float) -> float:
    return a + size_bytes * tree_rounds(n_receivers) / (eff * rate_bytes_s)


class Netns:
    """A switch (a bridge in its own namespace) and ``n`` node namespaces, each attached by a veth
    whose both directions are limited by ``tbf`` (so every node has an R up / R down NIC, as on a
    non-blocking switch). Node i is ``10.232.0.(i+1)``. Everything lives in namespaces named after
    this process; :meth:`close` deletes them (and with them the veths and the bridge)."""

    def __init__(self, n: int) -> None:
        tag = f"vlws{os.getpid()}"
        self.hub, self.nodes = f"{tag}h", [f"{tag}n{i}" for i in range(n)]
        self.made: list[str] = []
        try:
            for ns in [self.hub, *self.nodes]:
                self._ip("netns", "add", ns)
                self.made.append(ns)
                self._ip("-n", ns, "link", "set", "lo", "up")
            self._ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            self._ip("-n", self.hub, "link", "set", "br0", "up")
            for i, ns in enumerate(self.nodes):
                self._ip("link", "add", XN_IFACE, "netns", ns, "type", "veth",
                         "peer", "name", f"p{i}", "netns", self.hub)
                self._ip("-n", self.hub, "link", "set", f"p{i}", "master", "br0", "up")
                self._ip("-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", XN_IFACE)
                self._ip("-n", ns, "link", "set", XN_IFACE, "up")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def addr(i: int) -> str:
        return f"{XN_SUBNET}.{i + 1}"

    @staticmethod
    def _ip(*args: str) -> None:
        import subprocess

        p = subprocess.run(["ip", *args], capture_output=True, text=True)
        if p.returncode:
            raise RuntimeError(f"ip {' '.join(args)}: {p.stderr.strip()}")

    def set_rate(self, gbit: float, delay_ms: float = 0.0) -> None:
        """``gbit`` > 0: ``tbf`` (or ``netem`` with ``delay_ms``) on both ends of every node's veth;
        0: no limit (the CPU's own ceiling)."""
        import subprocess

        for i, ns in enumerate(self.nodes):
            for where, dev in ((ns, XN_IFACE), (self.hub, f"p{i}")):
                subprocess.run(["ip", "netns", "exec", where, "tc", "qdisc", "del", "dev", dev, "root"],
                               capture_output=True)
                if gbit <= 0:
                    continue
                rate = f"{gbit * 1000:g}mbit"
                if delay_ms > 0 and where == ns:  # one-way delay on the node's uplink only
                    qdisc = ["netem", "rate", rate, "delay", f"{delay_ms:g}ms", "limit", "100000"]
                else:  # burst: 1 ms at the rate (>= 256 KB so that a 64 KB GSO packet always fits)
                    burst = max(256 * 1024, int(gbit * 1e9 / 8 * 1e-3))
                    qdisc = ["tbf", "rate", rate, "burst", str(burst), "latency", "50ms"]
                p = subprocess.run(["ip", "netns", "exec", where, "tc", "qdisc", "add", "dev", dev, "root", *qdisc],
                                   capture_output=True, text=True)
                if p.returncode:
                    raise RuntimeError(f"tc qdisc add {' '.join(qdisc)} on {dev}: {p.stderr.strip()}")

    def close(self) -> None:
        import subprocess

        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.made.clear()


def xn_available() -> str:
    """'' when the cross-node case can run here, else why not."""
    import shutil

    if os.geteuid() != 0:
        return "not root (network namespaces and tc need root)"
    missing = [c for c in ("ip", "tc") if shutil.which(c) is None]
    return f"no {' / '.join(missing)} (iproute2)" if missing else ""


def _xn_member(argv: list[str]) -> None:
    """A cross-node member process (started by the driver inside a node namespace): reads JSON
    commands from stdin, answers one JSON line each on stdout."""
    import json
    import sys

    from vlgrpo.cluster.weight_sync import (SyncGroup, SyncGroupInfo, make_plan, receive_weights, send_weights,
                                             spec_of)

    torch.set_num_threads(1)
    rank, sizes = int(argv[0]), [float(x) for x in argv[1].split(",")]
    tensors = {s: make_tensors(model_shapes(s), 0 if rank == 0 else 100 + rank) for s in sizes}
    groups: dict = {}
    out = sys.stdout
    out.write(json.dumps({"ok": os.getpid()}) + "\n")
    out.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        op, reply = cmd["op"], {}
        if op == "join":
            info = SyncGroupInfo(cmd["addr"], cmd["port"], cmd["world"], "gloo", name=cmd["key"], timeout_s=600)
            groups[cmd["key"]] = SyncGroup(info, cmd["rank"])
        elif op == "sync":
            group, named = groups[cmd["key"]], tensors[cmd["size"]]
            plan = make_plan([spec_of(n, t) for n, t in named.items()], 1, cmd["bucket"])
            t0 = time.perf_counter()
            if rank == 0:
                send_weights(group, plan, named.items())
            else:
                for name, t in receive_weights(group, plan):
                    named[name].copy_(t)
            reply["s"] = time.perf_counter() - t0
        elif op == "scramble":
            for named in tensors.values():
                for t in named.values():
                    t.uniform_()
        elif op == "fp":
            reply["fp"] = fingerprint(tensors[cmd["size"]])
        elif op == "exit":
            break
        out.write(json.dumps(reply) + "\n")
        out.flush()
    for g in groups.values():
        g.close()


class _Proc:
    def __init__(self, ns: str, rank: int, sizes: list[float]) -> None:
        import subprocess
        import sys

        env = dict(os.environ, GLOO_SOCKET_IFNAME=XN_IFACE, OMP_NUM_THREADS="1")
        self.p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "vlgrpo.benchmarks.weight_sync",
                                   "--_xn-member", str(rank), ",".join(f"{s:g}" for s in sizes)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def send(self, **cmd) -> None:
        import json

        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()

    def recv(self) -> dict:
        import json

        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"cross-node member {self.p.pid} died (exit {self.p.wait()})")
        return json.loads(line)

    def stop(self, force: bool = False) -> None:
        import subprocess

        try:
            if force:  # a member failed: the others may wait in a collective for ever
                raise OSError
            self.send(op="exit")
            self.p.wait(timeout=20)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            self.p.kill()  # our own child
            self.p.wait()


def run_cross_node(sizes: list[float], recvs: list[int], buckets: list[float], rates: list[float], reps: int,
                   delay_ms: float, rows: list, points: list) -> None:
    """Sender in node namespace 0, receiver r in node namespace r; groups of 1..max(recvs) receivers
    formed once and kept; per link rate, every (size, receivers, bucket) measured round-robin
    ``reps`` times (the first rep of each verified). ``points``: (S bytes, N, R bytes/s, best s, bucket MB)."""
    n_nodes = 1 + max(recvs)
    net = Netns(n_nodes)
    procs: list[_Proc] = []
    t_start = time.perf_counter()
    ok = False
    try:
        procs = [_Proc(ns, r, sizes) for r, ns in enumerate(net.nodes)]
        for p in procs:
            p.recv()
        print(f"  cross-node: {n_nodes} processes up ({time.perf_counter() - t_start:.0f}s)", flush=True)
        for n in recvs:
            members = procs[:1 + n]
            for r, p in enumerate(members):
                p.send(op="join", key=f"xn{n}", addr=net.addr(0), port=29400 + n, world=1 + n, rank=r)
            for p in members:
                p.recv()

        def sync(n: int, size: float, bucket: float) -> float:
            members = procs[:1 + n]
            t0 = time.perf_counter()
            for p in members:
                p.send(op="sync", key=f"xn{n}", size=size, bucket=bucket)
            for p in members:
                p.recv()
            return time.perf_counter() - t0

        nbytes = {s: 4 * sum(_numel(x) for _, x in model_shapes(s)) for s in sizes}
        for gbit in rates:
            net.set_rate(gbit, delay_ms)
            for n in recvs:  # warm-up: connections, slow start
                sync(n, sizes[0], 16)
            times: dict = {(s, n, b): [] for s in sizes for n in recvs for b in buckets}
            for rep in range(reps):
                for key in times:
                    s, n, b = key
                    if rep == 0:
                        for p in procs[1:1 + n]:
                            p.send(op="scramble")
                        for p in procs[1:1 + n]:
                            p.recv()
                    times[key].append(sync(n, s, b))
                    if rep == 0:
                        fps = []
                        for p in procs[:1 + n]:
                            p.send(op="fp", size=s)
                            fps.append(p.recv()["fp"])
                        if any(abs(f - fps[0]) > 1e-6 * abs(fps[0]) for f in fps[1:]):
                            raise RuntimeError(f"cross-node {s:g} MB, {n} receivers: receivers got different bytes")
            rate_b = gbit * 1e9 / 8 if gbit > 0 else float("nan")
            for (s, n, b), ts in times.items():
                gbs = nbytes[s] / min(ts) / 1e9
                rows.append([f"{gbit:g} Gbit/s" if gbit > 0 else "unlimited", f"{s:g} MB", n, f"{b:g} MB",
                             min(ts) * 1e3, median(ts) * 1e3, gbs, gbs * 1e9 / rate_b,
                             gbs * 1e9 * tree_rounds(n) / rate_b])
                points.append((nbytes[s], n, rate_b, min(ts), b))
            link = f"{gbit:g} Gbit/s" if gbit > 0 else "no limit"
            print(f"  cross-node: {link} done ({time.perf_counter() - t_start:.0f}s)", flush=True)
        ok = True
    finally:
        for p in procs:
            p.stop(force=not ok)
        net.close()


def best_points(points: list) -> list[tuple[float, int, float, float]]:
    """Per (S, N, R) with a link limit, the best time over bucket sizes."""
    best: dict = {}
    for s, n, r, t, _b in points:
        if r == r and t < best.get((s, n, r), float("inf")):
            best[(s, n, r)] = t
    return [(s, n, r, t) for (s, n, r), t in sorted(best.items())]


def xn_headline(points: list) -> tuple[str, float]:
    """RESULT of the cross-node case: achieved bytes/s over the link rate, largest payload, fewest
    receivers, slowest limited link, best bucket size."""
    pts = best_points(points)
    s, n, r = max(p[0] for p in pts), min(p[1] for p in pts), min(p[2] for p in pts)
    t = min(p[3] for p in pts if p[:3] == (s, n, r))
    return f"weight_sync_xnode_over_link_{s / MiB:.0f}MB_{n}recv_{r * 8 / 1e9:g}gbit", s / t / r


def print_model(points: list) -> None:
    """Fit ``T = a + S ceil(log2(N+1)) / (eff R)`` per link rate (best bucket per point) and over all
    rates, and what it predicts for a 7B bf16 model (14 GB) to 8 and 64 nodes."""
    pts = best_points(points)
    if len(pts) < 2:
        return
    fits = {}
    for r in sorted({p[2] for p in pts}):
        sub = [p for p in pts if p[2] == r]
        if len(sub) >= 2:
            fits[f"{r * 8 / 1e9:g} Gbit/s"] = fit_sync_model(sub)
    print("\nmodel T = a + S * ceil(log2(N+1)) / (eff * R), fitted to the best bucket of each point:")
    for k, (a, eff) in fits.items():
        print(f"  {k}: a = {a * 1e3:.1f} ms, eff = {eff:.3f}")
    if not fits:
        return
    a, eff = fits[min(fits, key=lambda k: float(k.split()[0]))]  # the slowest link: bound by it, not by the CPU
    print(f"prediction for 7B bf16 (14 GB), with the slowest link's fit (a = {a * 1e3:.1f} ms, eff = {eff:.3f}), "
          "one gloo binomial tree:")
    for gbit in (100, 400):
        for n in (8, 64):
            print(f"  {n:2d} nodes, {gbit} Gbit/s: {predict_sync_s(14e9, n, gbit * 1e9 / 8, a, eff):.2f} s")


def main(argv: Optional[list[str]] = None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_xn-member"]:
        return _xn_member(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", default="50,500", help="comma-separated payload sizes (MB of fp32)")
    ap.add_argument("--receivers", default="1,2", help="comma-separated receiver counts")
    ap.add_argument("--shm-buckets-mb", default="4,16,64", help="bucket sizes to sweep for shared memory")
    ap.add_argument("--buckets-mb", default="1,16,64", help="bucket sizes to sweep for the gloo broadcast")
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions of every method (best and median shown)")
    ap.add_argument("--no-naive", action="store_true", help="skip the ray.put/get baseline")
    ap.add_argument("--cross-node", choices=("auto", "only", "off"), default="auto",
                    help="the cross-node case (network namespaces + tc): auto = before the same-node one when root "
                         "with iproute2, only = nothing else, off = skip it")
    ap.add_argument("--link-gbit", default="1,10", help="cross-node link rates in Gbit/s (0: no limit)")
    ap.add_argument("--xn-sizes-mb", default="50,500", help="cross-node payload sizes (MB of fp32)")
    ap.add_argument("--xn-receivers", default="1,2", help="cross-node receiver counts (one namespace each)")
    ap.add_argument("--xn-buckets-mb", default="16", help="cross-node bucket sizes (docs: 1,16,64)")
    ap.add_argument("--xn-reps", type=int, default=3, help="cross-node timed repetitions (round-robin)")
    ap.add_argument("--delay-ms", type=float, default=0.0,
                    help="one-way delay added on every node's uplink (needs the kernel's netem qdisc)")
    args = ap.parse_args(argv)
    sizes = [float(x) for x in args.sizes_mb.split(",")]
    recvs = sorted(int(x) for x in args.receivers.split(","))
    buckets = [float(x) for x in args.buckets_mb.split(",") if x]
    shm_buckets = [float(x) for x in args.shm_buckets_mb.split(",") if x]

    print(f"machine: {machine()}", flush=True)
    t_all = time.perf_counter()
    xn_rows: list = []
    xn_points: list = []
    why = xn_available() if args.cross_node != "off" else "--cross-node off"
    if why:
        print(f"cross-node case skipped: {why}", flush=True)
    else:
        xn_sizes = [float(x) for x in args.xn_sizes_mb.split(",")]
        xn_recvs = sorted(int(x) for x in args.xn_receivers.split(","))
        rates = [float(x) for x in args.link_gbit.split(",")]
        run_cross_node(xn_sizes, xn_recvs, [float(x) for x in args.xn_buckets_mb.split(",")], rates,
                       args.xn_reps, args.delay_ms, xn_rows, xn_points)
        print(table(["link", "payload", "receivers", "bucket", "best ms", "median ms", "GB/s (best)", "x link",
                     "x link x rounds"], xn_rows,
                    title=f"cross-node weight sync (gloo broadcast over veths limited by tc), {args.xn_reps} reps "
                          "round-robin; GB/s = payload bytes / 1e9 / wall s (each receiver gets all of it); x link = "
                          "that / link rate; x rounds: times ceil(log2(N+1)), the sends of gloo's binomial tree"))
        print_model(xn_points)
        print(f"  cross-node done ({time.perf_counter() - t_all:.0f}s)", flush=True)
        if args.cross_node == "only":
            result(*xn_headline(xn_points))
    if args.cross_node == "only":
        return

    init_ray(1 + max(recvs))
    rows: list = []
    summary: dict = {}
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
    if xn_points:
        result(*xn_headline(xn_points))
    key = (sizes[-1], recvs[0])
    if shm_buckets:
        result(f"weight_sync_shm_over_floor_{sizes[-1]:g}MB_{recvs[0]}recv", summary[key]["placed_x_floor"])
    else:
        result(f"weight_sync_broadcast_over_floor_{sizes[-1]:g}MB_{recvs[0]}recv", summary[key]["broadcast_x_floor"])


if __name__ == "__main__":
    from vlgrpo.benchmarks.weight_sync import main as _main

    _main()
