"""Real Ray nodes for multi-node tests on one machine: a head (`ray start --head`) and worker nodes that each
live in a mount namespace of their own with tmpfs over the folders they must not share, as on two machines.

Every node runs in its own mount namespace (`unshare --mount`, root only), so that all of its processes
(raylet, object store, Ray workers, dashboard agents) are found by that namespace and killed by pid: nothing
another person's Ray started is ever touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

RAY = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def namespaces_available() -> str | None:
    """None when this machine can start private nodes, else why not (one line)."""
    if os.geteuid() != 0:
        return "private-file-system nodes need root (unshare --mount, mount -t tmpfs); CI runs as root"
    if not shutil.which("unshare") or not shutil.which("mount"):
        return "private-file-system nodes need util-linux's unshare and mount"
    return None


def _mount_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _ports(head: bool) -> list[str]:
    """Ports of their own for the services of one node (two nodes on one machine would collide)."""
    args = [
        "--node-manager-port",
        "--object-manager-port",
        "--metrics-export-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
    ]
    if head:
        args.append("--ray-client-server-port")
    out = []
    for a in args:
        out += [a, str(free_port())]
    return out


class Node:
    """One `ray start --block` in a mount namespace of its own; `tmpfs` folders are private to it."""

    def __init__(self, cluster: Cluster, name: str, cmd: list[str], tmpfs: list[Path], env: dict):
        self.cluster, self.name = cluster, name
        self.log = cluster.root / f"{name}.log"
        mounts = "".join(
            f"mkdir -p {shlex.quote(str(p))} && mount -t tmpfs -o size=1g,mode=0755 invdyn-{name} "
            f"{shlex.quote(str(p))} && "
            for p in tmpfs
        )
        script = f"set -e; {mounts}exec {shlex.join(cmd)}"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--", "bash", "-c", script],
                env=env,
                cwd=cluster.root,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.namespace: str | None = None
        deadline = time.monotonic() + 30
        while self.namespace is None or self.namespace == _mount_ns(os.getpid()):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name}: {shlex.join(cmd)} exited: {self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: no mount namespace of its own after 30 s")
            self.namespace = _mount_ns(self.proc.pid)
            time.sleep(0.05)

    def pids(self) -> list[int]:
        """Every process of this node: those in its mount namespace (nothing else is in it)."""
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and _mount_ns(int(entry)) == self.namespace:
                found.append(int(entry))
        return found

    def kill(self) -> None:
        """SIGKILL every process of the node at once, as a lost machine: no clean shut-down."""
        for _ in range(20):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def stop(self, grace: float = 15) -> None:
        """`ray start --block` stops its node on SIGTERM; whatever is left is killed."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
        self.kill()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def sees(self, path) -> Path:
        """`path` as this node sees it (through its process's root, in its mount namespace)."""
        return Path(f"/proc/{self.proc.pid}/root") / Path(path).relative_to("/")


class Cluster:
    """A head node (dashboard on 127.0.0.1, token auth) and worker nodes with private folders.

    `env` is the environment of the nodes and of every client (`client_env`): the token rides in
    RAY_AUTH_TOKEN, so that a node whose HOME is private still has it."""

    def __init__(self, root: Path, env: dict):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        # Short: Ray's socket paths under it must stay within the 107 bytes of a Unix socket name.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
        token = subprocess.run(
            [RAY, "get-auth-token", "--generate"],
            env={**env, "HOME": str(self.root / "token-home")},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        self.token = token
        self.env = {
            **{k: v for k, v in env.items() if not k.startswith("RAY_")},
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": token,
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        self.port = free_port()
        self.dashboard_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.head: Node | None = None
        self.workers: list[Node] = []

    def start_head(self, num_cpus: int, tmpfs: list[Path] = (), env: dict | None = None) -> Node:
        cmd = [
            RAY,
            "start",
            "--head",
            "--block",
            "--port",
            str(self.port),
            "--num-cpus",
            str(num_cpus),
            "--include-dashboard",
            "true",
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(self.dashboard_port),
            "--temp-dir",
            str(self.temp_dir),
            "--disable-usage-stats",
            *_ports(head=True),
        ]
        self.head = Node(self, "head", cmd, list(tmpfs), {**self.env, **(env or {})})
        self.wait_for(self.head)
        return self.head

    def add_worker(self, num_cpus: int, private: list[Path], *, wait: bool = True) -> Node:
        """A worker node that sees its own empty tmpfs at each of `private` (and at Ray's temp dir)."""
        name = f"worker{len(self.workers) + 1}"
        cmd = [
            RAY,
            "start",
            "--address",
            self.address,
            "--block",
            "--num-cpus",
            str(num_cpus),
            "--temp-dir",
            str(self.temp_dir),
            "--disable-usage-stats",
            *_ports(head=False),
        ]
        home = self.root / f"{name}-home"  # on its tmpfs below: nothing of the head's HOME or caches
        env = {
            **self.env,
            "HOME": str(home),
            "INVDYN_HOME": f"{home}/invdyn",
            "D4RL_DATASET_DIR": f"{home}/d4rl",
        }
        node = Node(self, name, cmd, [self.temp_dir, home, *private], env)
        self.workers.append(node)
        if wait:
            self.wait_for(node)
        return node

    def _api(self, path: str) -> dict:
        req = urllib.request.Request(
            f"{self.dashboard}{path}", headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def nodes(self) -> list[dict]:
        """The cluster's nodes as the state API lists them (node_id, state, resources_total, ...)."""
        return self._api("/api/v0/nodes?limit=100&detail=true")["data"]["result"]["result"]

    def alive_nodes(self) -> list[dict]:
        return [n for n in self.nodes() if n.get("state") == "ALIVE"]

    def wait_for(self, node: Node, timeout: float = 180) -> str:
        """Wait until `node` is an alive node of the cluster; its node id. Fails at once if it exited."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if not node.alive:
                raise RuntimeError(f"{node.name} exited: {node.log.read_text()[-3000:]}")
            try:
                node_id = self.node_id_of(node)
                if any(n["node_id"] == node_id for n in self.alive_nodes()):
                    return node_id
                last = "not alive yet"
            except (OSError, LookupError) as e:
                last = str(e)
            time.sleep(0.5)
        raise TimeoutError(f"{node.name}: not an alive node after {timeout} s ({last})")

    def node_id_of(self, node: Node) -> str:
        """The Ray node id of `node`, from its raylet's command line (the raylet is in its namespace)."""
        for pid in node.pids():
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if args and args[0].endswith(b"/raylet"):
                for a in args:
                    if a.startswith(b"--node_id="):
                        return a.split(b"=", 1)[1].decode()
        raise LookupError(f"{node.name}: no raylet among its processes")

    def stop(self) -> None:
        for node in [*self.workers, self.head]:
            if node is not None:
                node.stop()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
