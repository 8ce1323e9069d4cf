"""A throwaway 3-node Docker Swarm on one machine, for the Swarm backend's tests and benchmarks (issue 17).

Each node is a Docker-in-Docker container (Debian's docker.io 20.10) on a user-defined bridge network of
its own; a local registry (Debian's docker-registry) runs on the same network. The host talks to every
node's engine directly at ``tcp://<node ip>:2375`` (plain TCP, reachable only on the lab network).

    with SwarmLab(base_image="ipybox/debian-base:bookworm") as lab:
        ref = lab.push_image("gradion-ai/ipybox")      # 172.x.y.z:5000/gradion-ai/ipybox:latest
        run(["docker", "-H", lab.manager_url, "service", "create", ...])
        lab.stop_node("node3")                          # power loss: SIGKILL of the node container

Everything created carries the label ``ipybox-test.swarmlab=1`` and the lab's id; ``close()`` removes it
all (idempotent); ``cleanup_stale()`` removes what earlier, crashed runs left (owner process gone).

Node containers run without ``--privileged`` (the machine lacks CAP_SYS_RESOURCE): the capability recipe
of /work/shared/MACHINE_NOTES.md. ``/var/lib/docker`` is an anonymous volume, so a node that is stopped
and started again keeps its swarm identity and images, like a rebooted machine.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import io
import json
import os
import secrets
import subprocess
import tarfile
import time
from dataclasses import dataclass, field

LABEL = "ipybox-test.swarmlab"
LAB_ID_LABEL = "ipybox-test.swarmlab.id"
OWNER_LABEL = "ipybox-test.swarmlab.owner"
HASH_LABEL = "ipybox-test.swarmlab.hash"
NODE_IMAGE = "ipybox-test/swarm-node"
ENGINE_PORT = 2375
REGISTRY_PORT = 5000

_DOCKERFILE = """\
FROM {base}
RUN apt-get update -q \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \\
      docker.io iptables docker-registry ca-certificates procps iproute2 \\
 && rm -rf /var/lib/apt/lists/*
COPY swarmlab-node /usr/local/bin/swarmlab-node
COPY registry.yml /etc/swarmlab/registry.yml
CMD ["/usr/local/bin/swarmlab-node"]
"""

# PID 1 is this shell, not dockerd, so kill_engine() can kill the engine without stopping the node.
_NODE_SCRIPT = """\
#!/bin/sh
set -e
mkdir -p /etc/docker
printf '%s\\n' "$SWARMLAB_DAEMON_JSON" > /etc/docker/daemon.json
rm -f /var/run/docker.pid
dockerd >>/var/log/dockerd.log 2>&1 &
exec sleep infinity
"""

_REGISTRY_CONFIG = """\
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: /var/lib/docker-registry
  delete:
    enabled: true
http:
  addr: :5000
"""

# The capability recipe that works here without --privileged (MACHINE_NOTES).
_NODE_RUN_ARGS = [
    "--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE",
    "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
    "--security-opt", "systempaths=unconfined",
    "--device-cgroup-rule", "a *:* rwm",
    "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw",
    "--init",  # reaps what kill_engine() orphans
    "--tmpfs", "/run",
    "-v", "/var/lib/docker",
]  # fmt: skip


# After kill_engine(): the orphaned containerd goes too (dockerd will not reuse it), then a fresh dockerd.
_RESTART_ENGINE = """
pid=$(cat /var/run/docker/containerd/containerd.pid 2>/dev/null) && kill -KILL "$pid" 2>/dev/null
rm -f /var/run/docker.pid /var/run/docker/containerd/containerd.pid
exec dockerd >>/var/log/dockerd.log 2>&1
"""


class SwarmLabError(RuntimeError):
    """The lab could not be built, started or driven; the message names the failing command."""


def _docker(*args: str, host: str | None = None, input: bytes | None = None, timeout: float = 120) -> str:
    cmd = ["docker", *(["-H", host] if host else []), *args]
    try:
        proc = subprocess.run(
            cmd, input=input, capture_output=True, timeout=timeout, stdin=None if input else subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as exc:
        raise SwarmLabError(f"timed out after {timeout}s: {' '.join(cmd)}") from exc
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        raise SwarmLabError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {err}")
    return proc.stdout.decode(errors="replace").strip()


def _owner() -> str:
    boot = ""
    with contextlib.suppress(OSError):
        boot = open("/proc/sys/kernel/random/boot_id").read().strip()
    return f"{boot}:{os.getpid()}"


def _owner_alive(owner: str) -> bool:
    boot, _, pid = owner.rpartition(":")
    if boot != _owner().rpartition(":")[0] or not pid.isdigit():
        return False
    return os.path.exists(f"/proc/{pid}")


def _context_tar(base_image: str) -> tuple[bytes, str]:
    files = {
        "Dockerfile": _DOCKERFILE.format(base=base_image).encode(),
        "swarmlab-node": _NODE_SCRIPT.encode(),
        "registry.yml": _REGISTRY_CONFIG.encode(),
    }
    base_id = _docker("image", "inspect", "-f", "{{.Id}}", base_image)
    digest = hashlib.sha256(base_id.encode())
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name] + b"\0")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755 if name == "swarmlab-node" else 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), digest.hexdigest()[:16]


def build_node_image(base_image: str, tag: str = NODE_IMAGE) -> str:
    """Builds the node image from `base_image` unless an image with the same content hash exists.

    apt inside the build uses the base image's sources (the host's Debian mirror, written by
    debootstrap). Returns the tag.
    """
    context, content_hash = _context_tar(base_image)
    with contextlib.suppress(SwarmLabError):
        if _docker("image", "inspect", "-f", f'{{{{index .Config.Labels "{HASH_LABEL}"}}}}', tag) == content_hash:
            return tag
    _docker("build", "-q", "--label", f"{HASH_LABEL}={content_hash}", "--label", f"{LABEL}=1", "-t", tag, "-",
            input=context, timeout=600)  # fmt: skip
    return tag


def cleanup_stale() -> list[str]:
    """Removes containers and networks of labs whose owner process is gone; returns what it removed."""
    removed: list[str] = []
    fmt = f'{{{{.ID}}}} {{{{.Label "{OWNER_LABEL}"}}}}'
    for line in _docker("ps", "-a", "--filter", f"label={LABEL}=1", "--format", fmt).splitlines():
        cid, _, owner = line.partition(" ")
        if not _owner_alive(owner):
            _docker("rm", "-fv", cid)
            removed.append(cid)
    for line in _docker("network", "ls", "--filter", f"label={LABEL}=1", "--format", "{{.ID}}").splitlines():
        owner = _docker("network", "inspect", "-f", f'{{{{index .Labels "{OWNER_LABEL}"}}}}', line)
        if not _owner_alive(owner):
            with contextlib.suppress(SwarmLabError):  # still in use by a container of a live lab
                _docker("network", "rm", line)
                removed.append(line)
    return removed


@dataclass
class Node:
    """One swarm node: a Docker-in-Docker container on the lab network."""

    hostname: str  # also the swarm node's hostname: node1, node2, ...
    container: str  # the node container's name on the host engine
    ip: str = ""
    node_id: str = ""
    manager: bool = False

    @property
    def engine_url(self) -> str:
        return f"tcp://{self.ip}:{ENGINE_PORT}"


@dataclass
class SwarmLab:
    """A swarm of `nodes` DinD nodes (the first `managers` are managers, the rest workers) plus a registry.

    The constructor does no I/O; `start()` (or `with`) builds it; `close()` removes it and may be called
    twice. Attributes after start: `manager_url`, `registry`, `nodes` (hostname -> Node),
    `engine_urls` (hostname -> url), `engine_urls_by_id` (swarm node id -> url), `node_ips`,
    `network`, `timings` (seconds per phase).
    """

    base_image: str = "ipybox/debian-base:bookworm"
    node_count: int = 3
    managers: int = 1
    heartbeat: str = "1s"
    ready_timeout: float = 90.0
    lab_id: str = field(default_factory=lambda: secrets.token_hex(4))
    nodes: dict[str, Node] = field(default_factory=dict)
    registry: str = ""
    network: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    images: dict[str, str] = field(default_factory=dict)  # host image -> its lab registry reference
    _closed: bool = False
    _started: bool = False

    # -- lifecycle -----------------------------------------------------------------------------------
    def __enter__(self) -> SwarmLab:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _labels(self) -> list[str]:
        return [
            "--label",
            f"{LABEL}=1",
            "--label",
            f"{LAB_ID_LABEL}={self.lab_id}",
            "--label",
            f"{OWNER_LABEL}={_owner()}",
        ]

    def start(self) -> SwarmLab:
        if self._started:
            raise SwarmLabError("this SwarmLab was already started; make a new one")
        if not 1 <= self.managers <= self.node_count:
            raise ValueError("managers must be between 1 and node_count")
        self._started = True
        try:
            t0 = time.monotonic()
            image = build_node_image(self.base_image)
            self.timings["node_image"] = time.monotonic() - t0
            t0 = time.monotonic()
            self._start_containers(image)
            self._wait_engines()
            self.timings["engines"] = time.monotonic() - t0
            t0 = time.monotonic()
            self._form_swarm()
            self.timings["swarm"] = time.monotonic() - t0
        except BaseException:
            self.close()
            raise
        return self

    def _start_containers(self, image: str) -> None:
        self.network = f"ipybox-swarmlab-{self.lab_id}"
        _docker("network", "create", *self._labels(), self.network)
        reg = f"{self.network}-registry"
        _docker("run", "-d", "--name", reg, "--network", self.network, *self._labels(), image,
                "docker-registry", "serve", "/etc/swarmlab/registry.yml")  # fmt: skip
        self.registry = f"{self._ip(reg)}:{REGISTRY_PORT}"
        daemon = {
            "no-new-privileges": True,
            "insecure-registries": [self.registry],
            "hosts": ["unix:///var/run/docker.sock", f"tcp://0.0.0.0:{ENGINE_PORT}"],
            # Explicit: without it 20.10 sleeps 15 s at start to warn about plain TCP.
            "tls": False,
        }
        for i in range(1, self.node_count + 1):
            node = Node(hostname=f"node{i}", container=f"{self.network}-node{i}", manager=i <= self.managers)
            env = f"SWARMLAB_DAEMON_JSON={json.dumps(daemon)}"
            _docker("run", "-d", "--name", node.container, "--hostname", node.hostname, "--network", self.network,
                    *self._labels(), *_NODE_RUN_ARGS, "-e", env, image)  # fmt: skip
            node.ip = self._ip(node.container)
            self.nodes[node.hostname] = node

    def _ip(self, container: str) -> str:
        return _docker(
            "inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{self.network}").IPAddress}}}}', container
        )

    def _wait_engines(self, nodes: list[Node] | None = None) -> None:
        deadline = time.monotonic() + self.ready_timeout
        for node in nodes or list(self.nodes.values()):
            while True:
                try:
                    _docker("version", "-f", "{{.Server.Version}}", host=node.engine_url, timeout=5)
                    break
                except SwarmLabError as exc:
                    if time.monotonic() > deadline:
                        log = self.node_exec(node.hostname, "tail", "-n", "20", "/var/log/dockerd.log")
                        raise SwarmLabError(f"engine of {node.hostname} not answering: {exc}\n{log}") from exc
                    time.sleep(0.1)

    def _form_swarm(self) -> None:
        first, *rest = self.nodes.values()
        _docker(
            "swarm",
            "init",
            "--advertise-addr",
            first.ip,
            "--dispatcher-heartbeat",
            self.heartbeat,
            host=first.engine_url,
        )
        tokens = {
            role: _docker("swarm", "join-token", "-q", role, host=first.engine_url) for role in ("manager", "worker")
        }

        def join(node: Node) -> None:
            token = tokens["manager" if node.manager else "worker"]
            _docker(
                "swarm", "join", "--advertise-addr", node.ip, "--token", token, f"{first.ip}:2377", host=node.engine_url
            )

        for node in [n for n in rest if n.manager]:  # managers one at a time (raft membership changes)
            join(node)
        with concurrent.futures.ThreadPoolExecutor() as pool:
            list(pool.map(join, [n for n in rest if not n.manager]))
        for node in self.nodes.values():
            node.node_id = _docker("info", "-f", "{{.Swarm.NodeID}}", host=node.engine_url)
        self.wait_node_state(*self.nodes, state="ready", timeout=self.ready_timeout)

    def close(self) -> None:
        """Removes the node containers (with their volumes), the registry and the network. Idempotent."""
        if self._closed:
            return
        self._closed = True
        ids = _docker("ps", "-aq", "--filter", f"label={LAB_ID_LABEL}={self.lab_id}")
        if ids:
            _docker("rm", "-fv", *ids.split())
        nets = _docker("network", "ls", "-q", "--filter", f"label={LAB_ID_LABEL}={self.lab_id}")
        if nets:
            _docker("network", "rm", *nets.split())

    # -- addresses -------------------------------------------------------------------------------------
    @property
    def manager(self) -> Node:
        return next(iter(self.nodes.values()))

    @property
    def manager_url(self) -> str:
        return self.manager.engine_url

    @property
    def engine_urls(self) -> dict[str, str]:
        return {name: node.engine_url for name, node in self.nodes.items()}

    @property
    def engine_urls_by_id(self) -> dict[str, str]:
        return {node.node_id: node.engine_url for node in self.nodes.values()}

    @property
    def node_ips(self) -> dict[str, str]:
        return {name: node.ip for name, node in self.nodes.items()}

    def node(self, name: str) -> Node:
        """A node by hostname (node1), swarm node id, or container name."""
        for node in self.nodes.values():
            if name in (node.hostname, node.node_id, node.container):
                return node
        raise KeyError(name)

    def docker(self, *args: str, node: str | None = None, timeout: float = 120) -> str:
        """Runs the docker CLI against the manager (or `node`'s engine); returns stdout."""
        url = self.node(node).engine_url if node else self.manager_url
        return _docker(*args, host=url, timeout=timeout)

    # -- images ----------------------------------------------------------------------------------------
    def push_image(self, image: str) -> str:
        """Copies `image` from the host engine into the lab registry; returns its registry reference.

        The host engine cannot push (the registry is not insecure there and the host daemon is not
        restarted), so the image goes `docker save | docker load` into node1, which pushes it.
        Other nodes pull it from the registry when a task needs it.
        """
        ref = f"{self.registry}/{image if ':' in image.rsplit('/', 1)[-1] else image + ':latest'}"
        t0 = time.monotonic()
        self.load_image(image, [self.manager.hostname])
        self.timings["load_node1"] = time.monotonic() - t0
        t0 = time.monotonic()
        _docker("tag", image, ref, host=self.manager_url)
        _docker("push", "-q", ref, host=self.manager_url, timeout=600)
        self.timings["push"] = time.monotonic() - t0
        self.images[image] = ref
        return ref

    def load_image(self, image: str, nodes: list[str] | None = None) -> None:
        """`docker save` on the host, `docker load` into each named node (all by default), in parallel."""
        targets = [self.node(n) for n in (nodes or list(self.nodes))]
        save = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        loads = [subprocess.Popen(["docker", "-H", n.engine_url, "load", "-q"], stdin=subprocess.PIPE,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for n in targets]  # fmt: skip
        assert save.stdout is not None
        try:
            while chunk := save.stdout.read(1 << 20):
                for load in loads:
                    assert load.stdin is not None
                    load.stdin.write(chunk)
        finally:
            for load in loads:
                assert load.stdin is not None
                with contextlib.suppress(BrokenPipeError):
                    load.stdin.close()
        if save.wait() != 0:
            raise SwarmLabError(f"docker save {image} failed")
        for node, load in zip(targets, loads, strict=True):
            assert load.stderr is not None
            err = load.stderr.read()
            if load.wait() != 0:
                raise SwarmLabError(f"docker load into {node.hostname} failed: {err.decode(errors='replace')}")

    # -- node failure and maintenance ------------------------------------------------------------------
    def node_exec(self, name: str, *cmd: str) -> str:
        try:
            return _docker("exec", self.node(name).container, *cmd)
        except SwarmLabError as exc:
            return str(exc)

    def stop_node(self, name: str) -> None:
        """Power loss: SIGKILL of the node container (its processes die at once)."""
        _docker("kill", self.node(name).container)

    def start_node(self, name: str, wait: bool = True) -> None:
        """Boots the node again (same volume: same swarm identity and images); waits for its engine."""
        node = self.node(name)
        _docker("start", node.container)
        ip = self._ip(node.container)
        if ip != node.ip:
            raise SwarmLabError(f"{node.hostname} came back with ip {ip}, not {node.ip}")
        if wait:
            self._wait_engines([node])

    def kill_engine(self, name: str) -> None:
        """SIGKILL of the node's inner dockerd only; the node container and its containerd stay."""
        _docker("exec", self.node(name).container, "sh", "-c", "kill -KILL $(cat /var/run/docker.pid)")

    def start_engine(self, name: str, wait: bool = True) -> None:
        node = self.node(name)
        _docker("exec", "-d", node.container, "sh", "-c", _RESTART_ENGINE)
        if wait:
            self._wait_engines([node])

    def drain(self, name: str) -> None:
        _docker("node", "update", "--availability", "drain", self.node(name).node_id, host=self.manager_url)

    def activate(self, name: str) -> None:
        _docker("node", "update", "--availability", "active", self.node(name).node_id, host=self.manager_url)

    def node_state(self, name: str) -> str:
        """The manager's view: ready, down, unknown, disconnected."""
        return _docker("node", "inspect", "-f", "{{.Status.State}}", self.node(name).node_id, host=self.manager_url)

    def wait_node_state(self, *names: str, state: str, timeout: float = 60.0) -> float:
        """Waits until the manager reports each node in `state`; returns the seconds it took."""
        t0 = time.monotonic()
        pending = list(names)
        while pending:
            pending = [n for n in pending if self.node_state(n) != state]
            if not pending:
                break
            if time.monotonic() - t0 > timeout:
                raise SwarmLabError(f"nodes {pending} not {state} after {timeout}s")
            time.sleep(0.1)
        return time.monotonic() - t0
