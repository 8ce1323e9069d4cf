"""Where a sandbox runs: the `backend=` option of `ExecutionContainer` and `SandboxPool`.

A backend does the two things that differ between places: it creates and starts the sandbox's
container with the secret handed over (`start`), and it removes everything it made (`remove`). Every
thing after the start is the same wherever the container runs, because a backend hands back an engine
client for the engine that runs it (`sandbox._docker`) and that engine's container object
(`sandbox._container`): isolation and firewall helpers, pause, logs, ports and inspection go through
them; clients reach the published ports at `sandbox.host`.

- `LocalEngine()` (the default): the engine of `DOCKER_HOST` or the local socket. Unchanged seed behaviour.
- `Swarm(manager, node_engines)` (`ipybox._swarm`): a service per sandbox, placed by the swarm; the
  per-container work goes to the engine of the node its task landed on.

docs/architecture.md ("Backends") says how a Kubernetes backend maps onto the same two methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiodocker

from ipybox._docker import connect, docker_errors
from ipybox._errors import ContainerError
from ipybox._labels import EXECUTOR_PORT

if TYPE_CHECKING:
    from ipybox.container import ExecutionContainer


@dataclass
class Located:
    """A running sandbox that `Backend.locate` found: what `ExecutionContainer.attach` needs of it."""

    docker: aiodocker.Docker  # a client of the engine that runs it (the caller closes it)
    container: Any  # that engine's container object
    info: dict[str, Any]  # the container's inspection
    host: str  # where its published ports are reached
    placement: Any = None  # what else the backend made for it (a swarm service), as `start` records it


class Backend:
    """Where sandboxes run. Subclasses implement `start` and `remove`; instances are shared by every
    sandbox of a pool, so they hold configuration and connections, never one sandbox's state."""

    #: Whether clients may take the direct routes (unix sockets through /proc, the container's bridge
    #: address) that `ipybox._routes` records for a container of this machine's engine. False for
    #: containers elsewhere: their bridge address may name a container of this host (security.md).
    direct_routes = False

    def check(self, sandbox: ExecutionContainer) -> None:
        """Refuse, at construction, options this backend cannot honour (`ValueError` naming the fix)."""

    async def start(self, sandbox: ExecutionContainer, token: str) -> None:
        """Create and start `sandbox`'s container with `token` handed over to its server only.

        On return: `sandbox._docker` is a client of the engine that runs the container, `sandbox._container`
        its (running) container object, `sandbox._image_id` the image id on that engine and, when clients
        reach the published ports elsewhere than `sandbox.host`, `sandbox.host` that address. As soon as
        anything exists that `remove` must remove, it is recorded on the sandbox (`_container`,
        `_placement`), so that a failed or cancelled start is cleaned up by `kill()`.
        """
        raise NotImplementedError

    async def remove(self, container: Any, docker: aiodocker.Docker | None, placement: Any) -> None:
        """Remove what `start` made (the container, and `placement`: what else the backend recorded) and
        close `docker`. Called once per sandbox by `kill()`; must succeed when parts are already gone."""
        raise NotImplementedError

    def describe(self, sandbox: ExecutionContainer) -> str:
        """Where the sandbox runs, for error messages ("" for the local engine)."""
        return ""

    async def locate(self, id_or_name: str) -> Located:
        """The running sandbox `id_or_name` (container id or a unique prefix, or name) for `attach`.

        Raises:
            ContainerError: Nothing of that id or name (status 404).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot attach to sandboxes")

    def protected_ports(self) -> list[int]:
        """Ports of the control plane that no sandbox may reach on any address (its isolation and
        firewall rules refuse them first): a swarm's engine and cluster ports. None locally, where the
        engine listens on a unix socket."""
        return []


class LocalEngine(Backend):
    """The engine of `DOCKER_HOST`, else the local socket: containers created directly (the default)."""

    direct_routes = True  # `ipybox._routes` checks that the engine and the container are this machine's

    async def start(self, sandbox: ExecutionContainer, token: str) -> None:
        await sandbox._start_on_engine(token)

    async def remove(self, container: Any, docker: aiodocker.Docker | None, placement: Any) -> None:
        from ipybox.container import _remove

        await _remove(container, docker)

    async def locate(self, id_or_name: str) -> Located:
        docker = connect()
        try:
            with docker_errors(f"looking up sandbox {id_or_name!r}"):
                try:
                    container = await docker.containers.get(id_or_name)
                except aiodocker.DockerError as exc:
                    if exc.status == 404:
                        raise ContainerError(f"no container {id_or_name!r} on this engine", status=404) from exc
                    raise
                info = await container.show()
        except BaseException:
            await docker.close()
            raise
        ports = (info.get("NetworkSettings") or {}).get("Ports") or {}
        bindings = ports.get(f"{EXECUTOR_PORT}/tcp") or [{}]
        return Located(docker, container, info, str(bindings[0].get("HostIp") or "127.0.0.1"))

    def __repr__(self) -> str:
        return "LocalEngine()"


# Defined in its own module (it needs Backend, above); offered here, where backends are chosen.
from ipybox._swarm import Swarm  # noqa: E402

__all__ = ["Backend", "LocalEngine", "Located", "Swarm"]
