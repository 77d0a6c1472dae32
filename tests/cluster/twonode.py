"""A two-node Ray cluster on one Linux machine, for tests: two network namespaces joined by a bridge.

    root namespace:  bridge vlgbr<id>  10.231.X.1/24  (the test process reaches the head through it)
    namespace A:     lo + eth0 (veth) 10.231.X.2    Ray head (GCS, dashboard/job API, raylet)
    namespace B:     lo + eth0 (veth) 10.231.X.3    Ray worker node (raylet)

Each node is one ``ip netns exec NS ray start ... --block`` process with its own ``--temp-dir`` (short,
under /tmp: Ray puts unix sockets there) and its own CPU count. Token authentication is on, as on a
real cluster: a fresh token file, ``RAY_AUTH_MODE=token`` + ``RAY_AUTH_TOKEN_PATH`` for both nodes and
for every driver or ``ray job`` command (``env``). Ports are fixed: each namespace has its own stack.
``/dev/shm`` is shared by the namespaces (they share the mount namespace), so shared-memory weight
sync works between actors of one node, exactly as on a real node; between nodes only the veth link
carries data.

Nothing here touches processes or interfaces it did not create: ``stop`` kills (SIGKILL, as
``ray stop --force``) the ``ray start`` processes it launched, their descendants, and whatever
process names a node's private temp dir on its command line (GCS, raylet, agents, workers that were
re-parented), then deletes the namespaces and the bridge. ``kill_node("B")`` does the same for one
node only: a node lost mid-run. Needs root and ``ip`` (iproute2); ``unavailable()`` says why not.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"
GCS_PORT, DASHBOARD_PORT = 6379, 8265


def unavailable() -> Optional[str]:
    """Why a two-node cluster cannot be built here (None: it can)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"vlgprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, ns: Optional[str] = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns, "ip"] if ns else ["ip"]) + list(args)
    out = subprocess.run(cmd, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip()}")
    return out


def _free_subnet() -> int:
    """X of a 10.231.X.0/24 no interface of the root namespace uses (another session's cluster)."""
    used = _ip("-4", "-o", "addr").stdout
    for x in [*range(secrets.randbelow(200) + 1, 255), *range(1, 255)]:
        if f"10.231.{x}." not in used:
            return x
    raise RuntimeError("no free 10.231.X.0/24 subnet")


_HOLD_SCRIPT = """
import sys, ray
from ray.util.placement_group import placement_group, remove_placement_group
address, ip, cpus = sys.argv[1], sys.argv[2], float(sys.argv[3])
ray.init(address=address, log_to_driver=False)
pg = placement_group([{"CPU": cpus, f"node:{ip}": 0.001}], strategy="STRICT_PACK")
ray.get(pg.ready(), timeout=120)
print("held", flush=True)
sys.stdin.readline()
remove_placement_group(pg)
print("released", flush=True)
sys.stdin.readline()
"""


@dataclass
class CpuHold:
    """CPUs of one node reserved by a driver process of ours (``TwoNodeCluster.hold_cpus``)."""

    proc: subprocess.Popen

    def expect(self, word: str, timeout: float) -> None:
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline, seen = time.monotonic() + timeout, []
        while time.monotonic() < deadline:
            if sel.select(timeout=1):
                line = self.proc.stdout.readline()
                if not line:
                    break
                seen.append(line)
                if line.strip() == word:
                    return
        self.kill()
        raise RuntimeError(f"CPU hold: no {word!r} within {timeout:.0f}s:\n{''.join(seen)[-3000:]}")

    def release(self, timeout: float = 60) -> None:
        self.proc.stdin.write("release\n")
        self.proc.stdin.flush()
        self.expect("released", timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@dataclass
class RayNode:
    name: str  # "A" (head) or "B"
    netns: str
    ip: str
    temp_dir: str
    cpus: int
    proc: Optional[subprocess.Popen] = None
    log: Optional[Path] = None


def process_tree(roots: list, spare: set) -> list:
    """``roots`` (psutil processes) and all their descendants, without the pids in ``spare``."""
    import psutil

    found = {}
    for r in roots:
        try:
            for p in [r, *r.children(recursive=True)]:
                found[p.pid] = p
        except psutil.NoSuchProcess:
            pass
    return [p for pid, p in found.items() if pid not in spare]


@dataclass
class TwoNodeCluster:
    """``start()`` builds the network and both nodes; ``stop()`` undoes everything (idempotent)."""

    workdir: Path  # logs and the auth token
    cpus_a: int = 4
    cpus_b: int = 2
    head_env: dict = field(default_factory=dict)  # extra env for the head only (Ray system config: RAY_...)
    node_env: dict = field(default_factory=dict)  # extra env for both nodes' `ray start` (their actors inherit it)
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    nodes: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)  # environment for drivers and `ray` commands against this cluster
    bridge: str = ""
    subnet: str = ""
    start_s: float = 0.0
    holds: list = field(default_factory=list)

    # -- addresses -------------------------------------------------------------------------------
    @property
    def head(self) -> RayNode:
        return self.nodes["A"]

    @property
    def gcs_address(self) -> str:
        return f"{self.head.ip}:{GCS_PORT}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.head.ip}:{DASHBOARD_PORT}"

    def in_ns(self, node: str, *cmd: str) -> list[str]:
        """``cmd`` run inside node ``node``'s namespace."""
        return ["ip", "netns", "exec", self.nodes[node].netns, *map(str, cmd)]

    # -- network ---------------------------------------------------------------------------------
    def _make_network(self) -> None:
        x = _free_subnet()
        self.subnet = f"10.231.{x}"
        self.bridge = f"vlgbr{self.tag}"
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, name in enumerate(("A", "B")):
            ns, outer = f"vlg{self.tag}{name}", f"vlg{self.tag}{name.lower()}"
            node = RayNode(name, ns, f"{self.subnet}.{i + 2}", "", self.cpus_a if name == "A" else self.cpus_b)
            self.nodes[name] = node
            _ip("netns", "add", ns)
            self._netns_etc(ns)
            _ip("link", "set", "lo", "up", ns=ns)
            _ip("link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", outer, "master", self.bridge)
            _ip("link", "set", outer, "up")
            _ip("addr", "add", f"{node.ip}/24", "dev", "eth0", ns=ns)
            _ip("link", "set", "eth0", "up", ns=ns)
            _ip("route", "add", "default", "via", f"{self.subnet}.1", ns=ns)

    def _netns_etc(self, ns: str) -> None:
        """/etc/hosts and resolv.conf inside ``ns`` (``ip netns exec`` bind-mounts /etc/netns/NS/*): the
        nodes' addresses resolve from the file and nothing waits for a DNS server the namespace cannot
        reach (c10d looks every peer's name up: 10 s of resolver timeouts per connection otherwise)."""
        etc = Path("/etc/netns") / ns
        etc.mkdir(parents=True, exist_ok=True)
        names = "".join(f"{self.subnet}.{i} vlg-{self.tag}-{n}\n" for i, n in ((1, "host"), (2, "a"), (3, "b")))
        (etc / "hosts").write_text(Path("/etc/hosts").read_text() + "\n" + names)
        (etc / "resolv.conf").write_text("options timeout:1 attempts:1\n")  # no server: lookups fail at once

    def _delete_network(self) -> None:
        for node in self.nodes.values():
            shutil.rmtree(Path("/etc/netns") / node.netns, ignore_errors=True)
            _ip("netns", "del", node.netns, check=False)  # takes its eth0 and the veth's outer end along
            _ip("link", "del", f"vlg{self.tag}{node.name.lower()}", check=False)
        if self.bridge:
            _ip("link", "del", self.bridge, check=False)

    def rx_bytes(self, node: str) -> int:
        """Bytes node ``node`` received over its veth so far."""
        text = _ip("-s", "link", "show", "eth0", ns=self.nodes[node].netns).stdout
        return int(re.search(r"RX:.*\n\s*(\d+)", text).group(1))

    # -- Ray -------------------------------------------------------------------------------------
    def start(self, timeout: float = 120) -> "TwoNodeCluster":
        t0 = time.perf_counter()
        self.workdir.mkdir(parents=True, exist_ok=True)
        token = self.workdir / "ray_auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN")}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0",
                        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        try:
            self._make_network()
            a, b = self.head, self.nodes["B"]
            self._launch(a, ["--head", f"--port={GCS_PORT}", "--include-dashboard=true",
                             f"--dashboard-host={a.ip}", f"--dashboard-port={DASHBOARD_PORT}"], self.head_env)
            self._wait_started(a, timeout)
            self._launch(b, [f"--address={self.gcs_address}"])
            self._wait_started(b, timeout)
            self._wait_alive(2, timeout)
        except BaseException:
            self.stop()
            raise
        self.start_s = time.perf_counter() - t0
        return self

    def _launch(self, node: RayNode, args: list[str], extra_env: Optional[dict] = None) -> None:
        node.temp_dir = tempfile.mkdtemp(prefix=f"vlg{node.name}-", dir="/tmp")
        node.log = self.workdir / f"ray_start_{node.name}.log"
        cmd = self.in_ns(node.name, RAY, "start", f"--node-ip-address={node.ip}", f"--num-cpus={node.cpus}",
                         "--num-gpus=0", f"--temp-dir={node.temp_dir}", "--disable-usage-stats", "--block", *args)
        with open(node.log, "w") as log:
            node.proc = subprocess.Popen(cmd, env={**self.env, **self.node_env, **(extra_env or {})}, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def _wait_started(self, node: RayNode, timeout: float) -> None:
        """Until ``ray start`` says "Ray runtime started." (cheaper to watch than ``ray status``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if node.proc.poll() is not None:
                raise RuntimeError(f"ray start on node {node.name} exited {node.proc.returncode}:\n"
                                   + node.log.read_text()[-4000:])
            if "Ray runtime started." in node.log.read_text(errors="replace"):
                return
            time.sleep(0.2)
        raise TimeoutError(f"ray start on node {node.name} did not finish within {timeout:.0f}s:\n"
                           + node.log.read_text()[-4000:])

    def alive_nodes(self) -> int:
        """Alive nodes as the GCS sees them (``ray status`` inside A; -1 when it does not answer)."""
        out = subprocess.run(self.in_ns("A", RAY, "status", f"--address={self.gcs_address}"), env=self.env,
                             capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            return -1
        active = out.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
        return len(re.findall(r"\bnode_[0-9a-f]+", active))

    def _wait_alive(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in self.nodes.values():
                if node.proc is not None and node.proc.poll() is not None:
                    raise RuntimeError(f"ray start on node {node.name} exited {node.proc.returncode}:\n"
                                       + node.log.read_text()[-4000:])
            if self.alive_nodes() == n:
                return
            time.sleep(1)
        raise TimeoutError(f"the cluster did not reach {n} alive node(s) within {timeout:.0f}s")

    def wait_nodes(self, n: int, timeout: float = 60) -> float:
        """Wait until the GCS counts ``n`` alive nodes; the seconds it took."""
        t0 = time.monotonic()
        self._wait_alive(n, timeout)
        return time.monotonic() - t0

    def hold_cpus(self, node: str, cpus: int, timeout: float = 120) -> "CpuHold":
        """Reserve ``cpus`` CPUs of node ``node`` (a placement group held by a small driver in namespace
        A) so that the next actors go elsewhere; ``release()`` frees them (a node's capacity set aside
        for later, e.g. for the replacements of a lost node's actors)."""
        hold = CpuHold(subprocess.Popen(
            self.in_ns("A", sys.executable, "-c", _HOLD_SCRIPT, self.gcs_address, self.nodes[node].ip, str(cpus)),
            env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        self.holds.append(hold)
        hold.expect("held", timeout)
        return hold

    # -- processes -------------------------------------------------------------------------------
    def processes(self, node: str) -> list:
        """Every live process of node ``node``: its ``ray start``, descendants, and whatever names its temp dir."""
        import psutil

        n = self.nodes[node]
        me = os.getpid()
        spare = {me, *(p.pid for p in psutil.Process(me).parents())}
        roots = []
        if n.proc is not None:
            try:
                roots.append(psutil.Process(n.proc.pid))
            except psutil.NoSuchProcess:
                pass
        if n.temp_dir:
            for p in psutil.process_iter(["pid", "cmdline"]):
                if p.info["pid"] not in spare and n.temp_dir in " ".join(p.info["cmdline"] or []):
                    roots.append(p)
        return process_tree(roots, spare)

    def kill_node(self, node: str) -> int:
        """SIGKILL every process of node ``node`` (raylet, agents, workers, actors); how many were killed."""
        import psutil

        killed = set()
        for _ in range(3):  # a dying raylet may still have spawned a worker: look again
            procs = self.processes(node)
            if not procs:
                break
            for p in procs:
                try:
                    p.kill()
                    killed.add(p.pid)
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(procs, timeout=15)
        n = self.nodes[node]
        if n.proc is not None:
            try:
                n.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        left = self.processes(node)
        assert not left, f"processes of node {node} survived SIGKILL: {[p.pid for p in left]}"
        return len(killed)

    def stop(self) -> None:
        """Kill both nodes' processes (B first: no raylet reconnects), remove temp dirs and the network."""
        errors = []
        for hold in self.holds:
            hold.kill()
        for name in ("B", "A"):
            node = self.nodes.get(name)
            if node is None:
                continue
            try:
                self.kill_node(name)
            except Exception as e:  # still remove the network and the other node
                errors.append(e)
            if node.temp_dir:
                shutil.rmtree(node.temp_dir, ignore_errors=True)
        self._delete_network()
        if errors:
            raise errors[0]
