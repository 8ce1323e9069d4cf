"""The Docker Swarm backend: one single-task service per sandbox, placed by the swarm.

The manager's API schedules (placement, spread over nodes, constraints) and owns the sandbox's
lifetime (the service); the engine of the node the task landed on does the per-container work that
the local backend does on the local engine: the secret's hand-over (`put_archive` into the running
container, whose server waits for it: `IPYBOX_TOKEN_WAIT`), the isolation and firewall helpers
(containers in the task's network namespace), pause, logs and inspection. Clients reach the task's
host-mode published ports at the node's address: no routing mesh (it needs IPVS).

What a service cannot express on engine API 1.41, and what is done instead (docs/architecture.md):
- no per-service `no-new-privileges` (engine 25+): the nodes' daemons must set it daemon-wide
  (`"no-new-privileges": true` in daemon.json); each start checks the task's NoNewPrivs flag;
- tmpfs mounts are always `noexec` and root-owned (their options arrive with API 1.46): `/tmp`,
  `/var/tmp` and `/run/lock` stay size-capped tmpfs (noexec, as locally), while `/app` and the home
  directory, which must allow executables (scripts, `uvx`/`npx` downloads), live in the container's
  writable layer, owned by the sandbox user and not size-capped (`app_size` does not apply);
- binds and workspaces are files of one machine: refused, with the fix named.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import ssl
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

import aiodocker
import aiohttp

from ipybox._docker import docker_errors
from ipybox._errors import (
    ContainerError,
    ContainerStartError,
    DockerUnavailableError,
    ImageNotFoundError,
    IpyboxError,
)
from ipybox._labels import CONTAINER_LABEL, EXECUTOR_PORT, RESOURCE_PORT
from ipybox.backends import Backend, Located

if TYPE_CHECKING:
    from ipybox.container import ExecutionContainer

logger = logging.getLogger(__name__)

SERVICE_PREFIX = "ipybox-"
TOKEN_WAIT = 60  # seconds the server waits for its secret after the start
_POLL = 0.1
_FAILED_STATES = {"failed", "rejected", "shutdown", "orphaned", "remove", "complete"}
_REMOVE_TIMEOUT = 30
_WRITABLE_DIRS = ("/tmp", "/var/tmp", "/run/lock")  # the tmpfs mounts kept on a swarm
_SERVICE_ID_LABEL = "com.docker.swarm.service.id"  # on every task's container
_SWEEP_EVERY = 60.0  # seconds between the sweeps `start` makes
_NODE_TIMEOUT = 10  # seconds a node's engine (or the manager, asked about a node) may take to answer


class SwarmPlacement:
    """What `Swarm.start` made for one sandbox: its service, and where its task landed."""

    def __init__(self, service_id: str, name: str) -> None:
        self.service_id = service_id
        self.name = name
        self.node_id = ""
        self.node_name = ""
        self.node_address = ""

    def describe(self) -> str:
        if not self.node_name:
            return f"swarm service {self.name}"
        return f"swarm node {self.node_name!r} ({self.node_address}), service {self.name}"


class Swarm(Backend):
    """Sandboxes as services of a Docker Swarm: `ExecutionContainer(backend=Swarm(...))`,
    `SandboxPool(backend=Swarm(...))`.

    Args:
        manager: The engine API of a manager node (`tcp://10.0.0.2:2375`, `https://...:2376` with `tls`).
        node_engines: Engine API of each node by its hostname or node id. Default for a node not
            listed: `tcp://<node address>:<node_engine_port>` (`https://` with `tls`).
        node_engine_port: The port of the nodes' engine APIs when `node_engines` does not name one.
        tls: An SSL context for the manager's and the nodes' engine APIs (client certificates).
        constraints: Placement constraints of every sandbox (`["node.labels.sandboxes==true"]`).
        spread: The placement preference (`node.id`: spread evenly over nodes; None: the swarm's default).
        node_addresses: The address clients use for a node's published ports, by hostname or node id.
            Default: the node's address in the swarm (`Status.Addr`).
        service_labels: Extra labels of each sandbox's service (the container's labels are the sandbox's).

    The nodes need the daemon setting `"no-new-privileges": true` (checked at every start), the image (a
    `tag` in a registry the nodes can pull from, e.g. `registry.example:5000/ipybox`), and their engine API
    reachable from this host only.
    """

    def __init__(
        self,
        manager: str,
        node_engines: Mapping[str, str] | None = None,
        *,
        node_engine_port: int = 2375,
        tls: ssl.SSLContext | None = None,
        constraints: Sequence[str] = (),
        spread: str | None = "node.id",
        node_addresses: Mapping[str, str] | None = None,
        service_labels: Mapping[str, str] | None = None,
    ) -> None:
        if not re.match(r"^(tcp|https?|unix)://", manager):
            raise ValueError(
                f"manager={manager!r} is not an engine API address: give tcp://HOST:PORT (or https:// with tls=)"
            )
        self.manager = manager
        self.node_engines = dict(node_engines or {})
        self.node_engine_port = node_engine_port
        self.tls = tls
        self.constraints = list(constraints)
        self.spread = spread
        self.node_addresses = dict(node_addresses or {})
        self.service_labels = dict(service_labels or {})
        self._swept: float | None = None  # when start() last swept leftover containers (monotonic)
        self._sweeps: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"Swarm({self.manager!r})"

    # -- Backend ----------------------------------------------------------------------------------

    def check(self, sandbox: ExecutionContainer) -> None:
        if sandbox.binds:
            raise ValueError(
                "binds cannot be used on a swarm: a bind is a directory of one machine, and the swarm chooses "
                "the node; move files in with ResourceClient.upload_file/upload_directory instead"
            )
        if sandbox.workspace is not None:
            raise ValueError(
                f"workspace={sandbox.workspace!r} cannot be used on a swarm: a named volume lives on one node; "
                "use snapshots (ipybox.snapshot) to carry /app between sandboxes"
            )
        if sandbox.network is not None:
            raise ValueError(
                f"network={sandbox.network!r} cannot be used on a swarm yet: tasks run on each node's default "
                "bridge, where each sandbox isolates itself; leave network unset"
            )
        if sandbox._executor_port is not None or sandbox._resource_port is not None:
            raise ValueError(
                "fixed executor_port/resource_port cannot be used on a swarm: each node picks free ports for its "
                "tasks; leave them unset (ExecutionContainer.executor_port tells the port chosen)"
            )

    async def start(self, sandbox: ExecutionContainer, token: str) -> None:
        from ipybox.container import image_ids, token_tar

        self._sweep_now()
        manager = self._engine(self.manager)
        placement: SwarmPlacement | None = None
        try:
            spec = self.service_spec(sandbox)
            with _swarm_errors("creating the sandbox's service on the swarm", self.manager):
                created = await manager.services.create(**spec)
            placement = SwarmPlacement(str(created["ID"]), spec["name"])
            sandbox._placement = placement
            task = await self._running_task(manager, placement, sandbox.startup_timeout)
            node = await self._node(manager, str(task["NodeID"]))
        finally:
            await manager.close()
        assert placement is not None
        self._place(placement, node)
        container_id = str(task["Status"]["ContainerStatus"]["ContainerID"])
        engine_url = self._node_engine_url(node)
        docker = self._engine(engine_url)
        sandbox._docker = docker
        where = placement.describe()
        with _swarm_errors(f"reaching the engine of {where} at {engine_url}", engine_url, container_id):
            sandbox._container = await docker.containers.get(container_id)
            info = await sandbox._container.show()
            image = await docker.images.inspect(str(info["Image"]))
        sandbox._image_id = str(image["Id"])
        sandbox.host = placement.node_address
        with docker_errors(f"placing the secret in the sandbox on {where}", container_id):
            await sandbox._container.put_archive(str(PurePosixPath("/run/ipybox")), token_tar(token, image_ids(image)))
        await _check_no_new_privileges(sandbox._container, where)

    async def remove(self, container: Any, docker: aiodocker.Docker | None, placement: Any) -> None:
        errors: list[str] = []
        if placement is not None:
            made: SwarmPlacement = placement
            manager = self._engine(self.manager)
            try:
                async with asyncio.timeout(_REMOVE_TIMEOUT):
                    await manager.services.delete(made.service_id)
            except aiodocker.DockerError as exc:
                if exc.status != 404:
                    errors.append(f"removing service {made.name} failed: {exc.message} (HTTP {exc.status})")
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                errors.append(
                    f"removing service {made.name} failed: the manager {self.manager} did not answer ({exc!r})"
                )
            finally:
                await manager.close()
        if container is not None:
            # The service's removal makes the node stop its task within the grace period; removing the
            # container at once frees its memory and ports now. A node that is down keeps it (stopped)
            # when it returns: `sweep()` removes it (start() sweeps once a minute, `ipybox cleanup --swarm`).
            problem = await self._remove_task_container(container, placement)
            if problem:
                errors.append(problem)
        if docker is not None:
            await docker.close()
        if errors:
            raise ContainerError("; ".join(errors), container_id=container.id if container is not None else None)

    async def _remove_task_container(self, container: Any, placement: Any) -> str:
        """Remove a task's container through its node's engine, unless the manager says the node is not up
        (its engine would not answer: a kill() must not wait for it). Returns an error, or ""."""
        if isinstance(placement, SwarmPlacement) and placement.node_id:
            state = await self._node_state(placement.node_id)
            if state not in ("ready", ""):
                logger.info(
                    "not removing container %s now: its node %s is %s (swept when it returns)",
                    container.id[:12],
                    placement.node_name,
                    state,
                )
                return ""
        try:
            async with asyncio.timeout(_NODE_TIMEOUT):
                await container.delete(force=True, v=True)
        except aiodocker.DockerError as exc:
            if exc.status not in (404, 409) and exc.status != 900:
                return f"removing container {container.id[:12]} failed: {exc.message}"
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            logger.info("removing container %s: its node's engine did not answer (%r)", container.id[:12], exc)
        return ""

    async def _node_state(self, node_id: str) -> str:
        """The manager's view of a node (ready, down, unknown, disconnected), or "" when it does not answer."""
        manager = self._engine(self.manager)
        try:
            async with asyncio.timeout(_NODE_TIMEOUT):
                node = await manager.nodes.inspect(node_id=node_id)
            return str((node.get("Status") or {}).get("State", ""))
        except (aiodocker.DockerError, aiohttp.ClientError, OSError, TimeoutError):
            return ""
        finally:
            await manager.close()

    def protected_ports(self) -> list[int]:
        """The engine APIs (manager, nodes: 2375/2376 unless configured otherwise), the swarm's cluster
        management (2377) and its gossip (7946): never reachable from a sandbox."""
        ports = {self.node_engine_port, 2375, 2376, 2377, 7946}
        for url in [self.manager, *self.node_engines.values()]:
            port = urllib.parse.urlsplit(url).port
            if port:
                ports.add(port)
        return sorted(ports)

    def describe(self, sandbox: ExecutionContainer) -> str:
        placement = sandbox._placement
        return placement.describe() if isinstance(placement, SwarmPlacement) else f"swarm at {self.manager}"

    # -- the service --------------------------------------------------------------------------------

    def service_spec(self, sandbox: ExecutionContainer) -> dict[str, Any]:
        """The service of one sandbox, translated from the container configuration the local backend
        uses (one place decides limits and labels); the keyword arguments of `services.create`."""

        config = sandbox._container_config((0, 0), None)
        host_config = config["HostConfig"]
        env = dict(item.split("=", 1) for item in config["Env"])
        env["IPYBOX_TOKEN_WAIT"] = str(TOKEN_WAIT)
        mounts = []
        for target, options in host_config.get("Tmpfs", {}).items():
            if target not in _WRITABLE_DIRS:
                continue  # /app and home: the container's layer (tmpfs mounts would be noexec here)
            fields = dict(part.split("=", 1) for part in options.split(",") if "=" in part)
            tmpfs: dict[str, Any] = {}
            if "size" in fields:
                tmpfs["SizeBytes"] = int(fields["size"])
            if "mode" in fields:
                tmpfs["Mode"] = int(fields["mode"], 8)
            mounts.append({"Type": "tmpfs", "Target": target, "TmpfsOptions": tmpfs})
        container_spec: dict[str, Any] = {
            "Image": config["Image"],
            "Env": env,
            "Labels": config["Labels"],
            "Init": True,
            "CapabilityDrop": ["ALL"],
            "Ulimits": host_config["Ulimits"],
            "Mounts": mounts,
            "StopGracePeriod": 1_000_000_000,
        }
        if host_config.get("Dns"):
            container_spec["DNSConfig"] = {"Nameservers": host_config["Dns"]}
        limits: dict[str, Any] = {}
        if "Memory" in host_config:
            limits["MemoryBytes"] = host_config["Memory"]
        if "NanoCpus" in host_config:
            limits["NanoCPUs"] = host_config["NanoCpus"]
        if "PidsLimit" in host_config:
            limits["Pids"] = host_config["PidsLimit"]
        placement: dict[str, Any] = {"Constraints": list(self.constraints)}
        if self.spread:
            placement["Preferences"] = [{"Spread": {"SpreadDescriptor": self.spread}}]
        task_template = {
            "ContainerSpec": container_spec,
            "Resources": {"Limits": limits},
            "RestartPolicy": {"Condition": "none", "MaxAttempts": 0},
            "Placement": placement,
            "LogDriver": {"Name": "json-file", "Options": {"max-size": "10m", "max-file": "2"}},
        }
        ports = [
            {"Protocol": "tcp", "TargetPort": port, "PublishMode": "host"} for port in (EXECUTOR_PORT, RESOURCE_PORT)
        ]
        return {
            "task_template": task_template,
            "name": f"{SERVICE_PREFIX}{secrets.token_hex(6)}",
            "labels": {**self.service_labels, **config["Labels"]},
            "mode": {"Replicated": {"Replicas": 1}},
            "endpoint_spec": {"Mode": "dnsrr", "Ports": ports},
        }

    async def _running_task(self, manager: aiodocker.Docker, placement: SwarmPlacement, timeout: float) -> Any:
        """The service's task once it runs; a task that failed or was rejected raises at once, naming why."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            with _swarm_errors("waiting for the sandbox's task", self.manager):
                tasks = await manager.tasks.list(filters={"service": placement.service_id})
            for task in tasks:
                status = task.get("Status") or {}
                state = str(status.get("State", ""))
                last = task
                if state == "running" and (status.get("ContainerStatus") or {}).get("ContainerID"):
                    return task
                if state in _FAILED_STATES:  # no restart policy: this task was the only one
                    raise await self._task_error(manager, placement, task)
            if time.monotonic() >= deadline:
                status = (last or {}).get("Status", {})
                state = status.get("State", "no task yet")
                message = status.get("Err") or status.get("Message", "")
                raise ContainerStartError(
                    f"the sandbox's task on the swarm was not running within startup_timeout={timeout} s "
                    f"(service {placement.name}, task state {state!r}: {message}). A 'pending' task means no node "
                    "can take it (constraints, resources, nodes down: `docker node ls`); a 'preparing' task, that its "
                    "node is still pulling the image (a node's first sandbox pulls it: raise startup_timeout, or pull "
                    "the image on every node beforehand)",
                    option="ExecutionContainer(startup_timeout=...)",
                )
            await asyncio.sleep(_POLL)

    async def _task_error(self, manager: aiodocker.Docker, placement: SwarmPlacement, task: Any) -> IpyboxError:
        status = task.get("Status") or {}
        error = str(status.get("Err") or status.get("Message") or status.get("State"))
        node = ""
        if task.get("NodeID"):
            with _quiet():
                info = await self._node(manager, str(task["NodeID"]))
                node = f" on node {(info.get('Description') or {}).get('Hostname', task['NodeID'][:12])!r}"
        image = ((task.get("Spec") or {}).get("ContainerSpec") or {}).get("Image", "")
        if "No such image" in error or "pull access denied" in error or "manifest unknown" in error:
            return _image_not_found(
                image,
                f"the sandbox's task{node} could not get image {image!r}: {error}. Each node pulls the image "
                "itself: push it to a registry every node can reach (docker tag + docker push) and pass that "
                "name as tag= (e.g. tag='registry.example:5000/ipybox'), or load it on every node",
            )
        return ContainerStartError(f"the sandbox's task{node} failed to start (service {placement.name}): {error}")

    async def _node(self, manager: aiodocker.Docker, node_id: str) -> Any:
        with _swarm_errors("looking up the task's node", self.manager):
            return await manager.nodes.inspect(node_id=node_id)

    def _place(self, placement: SwarmPlacement, node: Any) -> None:
        """Record on `placement` the node its task runs on."""
        placement.node_id = str(node["ID"])
        placement.node_name = _hostname(node)
        placement.node_address = self._node_address(node)

    def _node_address(self, node: Any) -> str:
        hostname = str((node.get("Description") or {}).get("Hostname") or "")
        for key in (hostname, str(node["ID"])):
            if key in self.node_addresses:
                return self.node_addresses[key]
        return str((node.get("Status") or {}).get("Addr") or hostname)

    def _node_engine_url(self, node: Any) -> str:
        hostname = str((node.get("Description") or {}).get("Hostname") or "")
        for key in (hostname, str(node["ID"])):
            if key in self.node_engines:
                return self.node_engines[key]
        scheme = "https" if self.tls is not None else "tcp"
        return f"{scheme}://{(node.get('Status') or {}).get('Addr')}:{self.node_engine_port}"

    def _engine(self, url: str) -> aiodocker.Docker:
        return aiodocker.Docker(url=url, ssl_context=self.tls) if self.tls is not None else aiodocker.Docker(url=url)

    # -- attach -------------------------------------------------------------------------------------

    async def locate(self, id_or_name: str) -> Located:
        """The sandbox whose service is `id_or_name` (name or id), or whose running task's container id
        starts with it: found through the manager, reached through its node's engine."""
        manager = self._engine(self.manager)
        try:
            task = await self._task_of(manager, id_or_name)
            with _swarm_errors("looking up the sandbox's service", self.manager):
                service = await manager.services.inspect(str(task["ServiceID"]))
            node = await self._node(manager, str(task["NodeID"]))
        finally:
            await manager.close()
        placement = SwarmPlacement(str(service["ID"]), str(service["Spec"]["Name"]))
        self._place(placement, node)
        container_id = str(task["Status"]["ContainerStatus"]["ContainerID"])
        engine_url = self._node_engine_url(node)
        docker = self._engine(engine_url)
        try:
            where = f"{placement.describe()} at {engine_url}"
            with _swarm_errors(f"reaching the engine of {where}", engine_url, container_id):
                container = await docker.containers.get(container_id)
                info = await container.show()
        except BaseException:
            await docker.close()
            raise
        return Located(docker, container, info, placement.node_address, placement)

    async def _task_of(self, manager: aiodocker.Docker, id_or_name: str) -> Any:
        """The running task of the sandbox service `id_or_name`, or the one whose container id starts with it."""
        with _swarm_errors("listing the swarm's sandbox tasks", self.manager):
            services = {
                str(s["ID"]): str(s["Spec"]["Name"])
                for s in await manager.services.list(filters={"label": [CONTAINER_LABEL]})
            }
            tasks = await manager.tasks.list(filters={"desired-state": "running"})
        running = [
            t
            for t in tasks
            if str(t.get("ServiceID")) in services
            and (t.get("Status") or {}).get("State") == "running"
            and ((t.get("Status") or {}).get("ContainerStatus") or {}).get("ContainerID")
        ]
        by_service = [t for t in running if id_or_name in (t["ServiceID"], services[str(t["ServiceID"])])]
        by_container = [t for t in running if t["Status"]["ContainerStatus"]["ContainerID"].startswith(id_or_name)]
        matches = by_service or (by_container if len(id_or_name) >= 4 else [])
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise ContainerError(f"{id_or_name!r} names {len(matches)} sandboxes on the swarm: give more of the id")
        raise ContainerError(
            f"no running ipybox sandbox {id_or_name!r} on the swarm at {self.manager} (a service name or id, or "
            "its task's container id)",
            status=404,
        )

    # -- clean-up across the swarm -----------------------------------------------------------------

    async def remove_all(self, selector: Sequence[str] = ()) -> list[str]:
        """Remove every ipybox sandbox service of the swarm (with all of `selector`'s labels too); their
        tasks' containers go on every node, nodes that are down included once they return."""
        manager = self._engine(self.manager)
        removed = []
        try:
            with _swarm_errors("listing the swarm's sandbox services", self.manager):
                services = await manager.services.list(filters={"label": [CONTAINER_LABEL, *selector]})
            for service in services:
                try:
                    await manager.services.delete(str(service["ID"]))
                    removed.append(str(service["Spec"]["Name"]))
                except aiodocker.DockerError as exc:
                    if exc.status != 404:
                        raise ContainerError(
                            f"removing service {service['Spec']['Name']} failed: {exc.message}"
                        ) from exc
        finally:
            await manager.close()
        return removed

    async def ready_nodes(self) -> list[Any]:
        """The manager's records of the nodes that are up (`ready`)."""
        manager = self._engine(self.manager)
        try:
            return await self._ready_nodes(manager)
        finally:
            await manager.close()

    async def _ready_nodes(self, manager: aiodocker.Docker) -> list[Any]:
        with _swarm_errors("listing the swarm's nodes", self.manager):
            return [n for n in await manager.nodes.list() if (n.get("Status") or {}).get("State") == "ready"]

    async def sweep(self, selector: Sequence[str] = (), *, timeout: float = 10) -> list[tuple[str, str]]:
        """Remove the ipybox task containers (with all of `selector`'s labels too) whose service is gone,
        on every node that is up; returns `(node hostname, container id)` of each removed.

        A node that was down when its sandbox was killed keeps the task's container (stopped, status
        255) once it returns; the swarm reaps it only with its task history. Nodes that are down are
        skipped (swept next time); `timeout` bounds each node's engine.
        """
        manager = self._engine(self.manager)
        try:
            nodes = await self._ready_nodes(manager)
            # Containers first, services second: a container listed has its service created already, so a
            # sandbox starting meanwhile is never taken for a leftover.
            found = await asyncio.gather(*(self._task_containers(node, selector, timeout) for node in nodes))
            with _swarm_errors("listing the swarm's sandbox services", self.manager):
                services = {str(s["ID"]) for s in await manager.services.list(filters={"label": [CONTAINER_LABEL]})}
        finally:
            await manager.close()
        removed: list[tuple[str, str]] = []
        for node, (engine_url, containers) in zip(nodes, found, strict=True):
            hostname = _hostname(node)
            leftovers = [c for c in containers if (c["Labels"] or {}).get(_SERVICE_ID_LABEL) not in services]
            if not leftovers:
                continue
            docker = self._engine(engine_url)
            try:
                for container in leftovers:
                    try:
                        async with asyncio.timeout(timeout):
                            await docker.containers.container(container.id).delete(force=True, v=True)
                        removed.append((hostname, container.id))
                    except aiodocker.DockerError as exc:
                        if exc.status not in (404, 409):
                            logger.warning("sweep: removing %s on %s failed: %s", container.id[:12], hostname, exc)
                    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                        logger.info("sweep: the engine of %s did not answer (%r)", hostname, exc)
                        break
            finally:
                await docker.close()
        return removed

    async def _task_containers(self, node: Any, selector: Sequence[str], timeout: float) -> tuple[str, list[Any]]:
        """The node's engine URL and its ipybox task containers (raw list entries); none if it does not answer."""
        url = self._node_engine_url(node)
        docker = self._engine(url)
        try:
            async with asyncio.timeout(timeout):
                labels = [CONTAINER_LABEL, _SERVICE_ID_LABEL, *selector]
                found = await docker.containers.list(all=True, filters={"label": labels})
            return url, list(found)
        except (aiodocker.DockerError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            logger.info("sweep: the engine of node %s at %s did not answer (%r)", node["ID"][:12], url, exc)
            return url, []
        finally:
            await docker.close()

    def _sweep_now(self) -> None:
        """From `start`: a sweep in the background, at most once per `_SWEEP_EVERY` seconds per backend."""
        now = time.monotonic()
        if self._swept is not None and now - self._swept < _SWEEP_EVERY:
            return
        self._swept = now
        task = asyncio.get_running_loop().create_task(self._sweep_quietly(), name="ipybox-swarm-sweep")
        self._sweeps.add(task)
        task.add_done_callback(self._sweeps.discard)

    async def _sweep_quietly(self) -> None:
        try:
            removed = await self.sweep(timeout=5)
        except Exception as exc:  # a background chore: the next start tries again
            logger.info("sweeping leftover sandbox containers on the swarm failed: %s", exc)
            return
        for hostname, container_id in removed:
            logger.info("removed leftover sandbox container %s on swarm node %s", container_id[:12], hostname)


def _image_not_found(tag: str, message: str) -> ImageNotFoundError:
    """An `ImageNotFoundError` with a swarm's message: its own says to build the image locally, which
    does not help nodes that pull it from a registry."""
    return ImageNotFoundError(
        tag, message=message, option="docker push to a registry the nodes can reach; tag=<that name>"
    )


async def _check_no_new_privileges(container: Any, where: str) -> None:
    """A swarm service cannot ask for no-new-privileges on engine API 1.41: the node's daemon must."""
    with docker_errors(f"checking the sandbox's privileges on {where}", container.id):
        execution = await container.exec(["grep", "^NoNewPrivs:", "/proc/1/status"], stdout=True, stderr=True)
        async with execution.start(detach=False) as stream:
            output = b""
            while (message := await stream.read_out()) is not None:
                output += message.data
    if not output.split() or output.split()[-1] != b"1":
        raise ContainerStartError(
            f"the sandbox on {where} runs without no-new-privileges ({output.decode(errors='replace').strip()!r}): "
            'set "no-new-privileges": true in that node\'s /etc/docker/daemon.json and restart its engine; '
            "a swarm service cannot ask for it on this engine version",
            container_id=container.id,
        )


def _hostname(node: Any) -> str:
    """A node's name in messages: its hostname, else the start of its id."""
    return str((node.get("Description") or {}).get("Hostname") or node["ID"][:12])


class _swarm_errors:
    """`docker_errors` for a remote engine: names the endpoint instead of the local-engine hint."""

    def __init__(self, action: str, endpoint: str, container_id: str | None = None) -> None:
        self.action, self.endpoint, self.container_id = action, endpoint, container_id

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            return
        if isinstance(exc, aiodocker.DockerError) and exc.status != 900:
            raise ContainerError(
                f"{self.action} failed: {exc.message} (HTTP {exc.status})",
                container_id=self.container_id,
                status=exc.status,
            ) from exc
        if isinstance(exc, aiodocker.DockerError | aiohttp.ClientError | OSError | TimeoutError):
            raise DockerUnavailableError(
                f"{self.action} failed: the engine at {self.endpoint} does not answer ({exc!r}). Check that the "
                "node is up and its engine API is reachable from this host"
            ) from exc


class _quiet:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        return isinstance(exc, Exception)
