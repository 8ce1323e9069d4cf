"""The sandbox behind `ipybox mcp`: one container, one kernel, started in the background."""

from __future__ import annotations

import asyncio
import contextlib
import json
import keyword
import logging
import os
import re
import shlex
import stat
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ipybox._errors import ImageNotFoundError, ResourceError
from ipybox.approvals import AllowList
from ipybox.executor import ExecutionClient, ExecutionResult
from ipybox.pool import Sandbox as PooledSandbox
from ipybox.pool import SandboxPool, start_sandbox
from ipybox.resource import _beneath, _files
from ipybox.resource._mcp import check_server_params
from ipybox.resource.client import ResourceClient
from ipybox.tool_host import ToolHost

logger = logging.getLogger("ipybox.mcp")

OUTPUT_DIR = ".ipybox/outputs"
"""Where truncated outputs are saved in full, relative to /app."""
TOOLS_RELPATH = "mcptools"
"""Where the packages of host-side MCP servers are generated, relative to /app."""


@dataclass
class SandboxOptions:
    tag: str
    allowed_dirs: list[Path]
    allowed_domains: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)
    binds: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    memory_limit: str | None = "4g"
    cpu_limit: float | None = None
    pids_limit: int | None = 1024
    max_output_chars: int = 20_000
    pool: int = 0
    """Spare sandboxes kept ready (SandboxPool), so `reset(new_sandbox=True)` switches at once."""
    tool_servers: dict[str, dict[str, Any]] = field(default_factory=dict)
    """MCP servers run on the host (a ToolHost per sandbox), as packages `/app/mcptools/<name>/`."""
    owner_bound: bool = True
    """Sandboxes (pooled spares too) remove themselves when this process dies, SIGKILL included."""
    allowed_calls: list[str] | None = None
    """`AllowList` patterns ("server.tool", "server", "shell", "shell.system", ...): with them, approvals
    are on and the code's MCP tool calls and shell escapes that match none are denied. None: all run."""


class PathNotAllowedError(PermissionError):
    """A host path outside the directories the server may read and write, or through a symlink below them."""


class AllowedDirs:
    """The host directories the server may read and write, each opened once and used through that
    descriptor from then on.

    `Sandbox.start` opens them, before any container exists. A requested path is made absolute as text
    (a relative one against the first directory, `..` resolved lexically, root-owned links in `/` such
    as macOS's `/tmp` resolved) and must lie below a directory, named as it was given or by its
    physical path. The transfer then reaches it from that directory's descriptor one component at a
    time and follows no symlink at all, even one pointing inside (`_beneath`): sandbox code can swap
    any directory of a bind mount for a link at any moment, and `realpath` checked once would be stale
    by the time the path is opened.
    """

    def __init__(self, directories: list[Path]) -> None:
        self.directories = directories
        self._roots: list[tuple[_beneath.Root, list[list[str]]]] | None = None
        self._closed = False

    def open(self) -> None:
        """Open every directory, once."""
        if self._closed:
            raise RuntimeError("the allowed directories were closed: the server is shutting down")
        if self._roots is not None:
            return
        roots: list[tuple[_beneath.Root, list[list[str]]]] = []
        try:
            for directory in self.directories:
                root = _beneath.Root.open(directory)
                roots.append((root, [_beneath.root_links_resolved(directory), _beneath.components(root.path)]))
        except BaseException:
            for root, _ in roots:
                root.close()
            raise
        self._roots = roots

    def close(self) -> None:
        self._closed = True
        for root, _ in self._roots or []:
            root.close()
        self._roots = None

    def find(self, local_path: str) -> tuple[_beneath.Root, Path]:
        """The directory `local_path` lies below, and the path as the root's path plus what is below."""
        self.open()
        assert self._roots is not None
        path = Path(local_path).expanduser()
        parts = _beneath.root_links_resolved(path if path.is_absolute() else self.directories[0] / path)
        found: tuple[int, _beneath.Root] | None = None
        for root, names in self._roots:
            for name in names:
                if parts[: len(name)] == name and (found is None or len(name) > found[0]):
                    found = (len(name), root)
        if found is None:
            allowed = ", ".join(str(directory) for directory in self.directories)
            raise PathNotAllowedError(
                f"local path {local_path!r} (absolute: {os.sep + os.sep.join(parts)}) is outside the allowed "
                f"directories: {allowed}. Start `ipybox mcp` with --allowed-dir to allow more."
            )
        length, root = found
        return root, Path(root.path, *parts[length:])

    def root_of(self, path: Path) -> _beneath.Root:
        """The directory below which `path`, as `find` returned it, lies."""
        self.open()
        assert self._roots is not None
        parts = _beneath.components(path)
        # names[-1]: the directory's physical path, which `find` puts in front of what lies below.
        below = [(len(names[-1]), root) for root, names in self._roots if parts[: len(names[-1])] == names[-1]]
        if not below:
            raise PathNotAllowedError(f"{path} is outside the allowed directories")
        return max(below, key=lambda found: found[0])[1]

    def refused_link(self, local_path: str, link: str) -> PathNotAllowedError:
        allowed = ", ".join(str(directory) for directory in self.directories)
        return PathNotAllowedError(
            f"local path {local_path!r} goes through the symbolic link {link}: ipybox mcp follows no link "
            f"below its allowed directories ({allowed}), as sandbox code can plant them; pass a path "
            "without symbolic links"
        )


class Sandbox:
    """Owns the container and the clients; tool calls wait for `start()` to finish.

    Calls on the kernel are serialized by one lock, so a `reset` waits for a running cell.
    """

    def __init__(self, options: SandboxOptions, build: Callable[[str], None] | None = None) -> None:
        self.options = options
        self._build = build
        self._current: PooledSandbox | None = None
        self._pool: SandboxPool | None = None
        self._client: ExecutionClient | None = None
        self._resources: ResourceClient | None = None
        self._tool_host: ToolHost | None = None
        self._started: asyncio.Task[None] | None = None
        self._kernel_lock = asyncio.Lock()
        self._closing: asyncio.Future[None] | None = None
        self._output_counter = 0
        self._allowed = AllowedDirs(options.allowed_dirs)

    def start(self) -> None:
        """Open the allowed directories, then start the container in the background (the MCP handshake
        does not wait for it)."""
        self._allowed.open()  # before any container exists, so no sandbox code can have touched them
        self._started = asyncio.create_task(self._start(), name="ipybox-mcp-sandbox-start")

    async def _start(self) -> None:
        options = self.options
        if self._build is not None:
            await asyncio.to_thread(self._build, options.tag)
        if options.pool:
            self._pool = SandboxPool(
                options.pool,
                firewall=options.allowed_domains,
                client_options=self._client_options(),
                **self._container_options(),
            )
            await self._pool.start()
        await self._switch_to(await self._new_sandbox())

    def _container_options(self) -> dict[str, Any]:
        options = self.options
        return {
            "tag": options.tag,
            "binds": options.binds,
            "env": options.env,
            "show_pull_progress": True,
            "memory_limit": options.memory_limit,
            "cpu_limit": options.cpu_limit,
            "pids_limit": options.pids_limit,
            "labels": options.labels,
            "owner_bound": options.owner_bound,
        }

    def _client_options(self) -> dict[str, Any]:
        if self.options.allowed_calls is None:
            return {}
        return {"approvals": AllowList(self.options.allowed_calls)}

    async def _new_sandbox(self) -> PooledSandbox:
        """A ready sandbox: from the pool when there is one, else a container started now."""
        if self._pool is not None:
            return await self._pool.acquire()
        return await start_sandbox(
            self._container_options(), self.options.allowed_domains, client_options=self._client_options()
        )

    async def _switch_to(self, sandbox: PooledSandbox) -> None:
        """Make `sandbox` the one tool calls use (with its host-side tools); the previous one is removed."""
        resources = ResourceClient(port=sandbox.container.resource_port)
        tool_host: ToolHost | None = None
        try:
            await resources.connect()
            if self.options.tool_servers:
                tool_host = ToolHost(sandbox.container.resource_port, self.options.tool_servers)
                await tool_host.start()
                modules = await tool_host.generate_mcp_sources(TOOLS_RELPATH)
                logger.info(
                    "host-side MCP servers: %s",
                    "; ".join(f"{name} ({len(tools)} tools)" for name, tools in modules.items()),
                )
        except BaseException:
            with contextlib.suppress(Exception):
                await resources.disconnect()
            try:
                if tool_host is not None:
                    await tool_host.close()
            finally:
                await sandbox.close()
            raise
        previous, previous_resources, previous_tools = self._current, self._resources, self._tool_host
        self._current, self._client, self._resources = sandbox, sandbox.client, resources
        self._tool_host = tool_host
        logger.info("sandbox %s ready", (sandbox.container.container_id or "")[:12])
        if previous_resources is not None:
            with contextlib.suppress(Exception):
                await previous_resources.disconnect()
        if previous_tools is not None:
            with contextlib.suppress(Exception):
                await previous_tools.close()
        if previous is not None:
            await previous.close()

    async def ready(self) -> tuple[ExecutionClient, ResourceClient]:
        """Wait for the start; re-raise its failure (with its cause) on every call."""
        if self._started is None:
            raise RuntimeError("the sandbox was not started")
        try:
            await asyncio.shield(self._started)
        except ImageNotFoundError:
            raise
        except Exception as exc:
            raise RuntimeError(f"the sandbox could not be started: {exc}") from exc
        assert self._client is not None and self._resources is not None
        return self._client, self._resources

    async def close(self) -> None:
        """Remove the container and close the clients; safe to call at any point.

        Concurrent calls (the end of stdin and a SIGTERM) all wait for the one removal: the signal
        handler exits the process right after, which must not cut the first call short.
        """
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        if self._started is not None and not self._started.done():
            self._started.cancel()
            with contextlib.suppress(BaseException):
                await self._started
        for closer in (self._client, self._resources):
            if closer is not None:
                with contextlib.suppress(Exception):
                    await closer.disconnect()
        if self._tool_host is not None:
            with contextlib.suppress(Exception):
                await self._tool_host.close()
        try:
            if self._current is not None:
                await self._current.close()
        finally:
            try:
                if self._pool is not None:
                    await self._pool.close()
            finally:
                self._allowed.close()

    # -- tools ------------------------------------------------------------------------------------

    async def execute(self, code: str, timeout: float, max_output_chars: int | None) -> ExecutionResult:
        client, resources = await self.ready()
        async with self._kernel_lock:
            result = await client.execute(code, timeout=timeout)
        limit = max_output_chars or self.options.max_output_chars
        if result.text is not None and len(result.text) > limit:
            saved = await self._save_output(resources, result.text)
            result.text = truncate_middle(result.text, limit, saved)
        return result

    async def reset(self, new_sandbox: bool = False) -> None:
        client, _ = await self.ready()
        async with self._kernel_lock:
            if new_sandbox:
                await self._switch_to(await self._new_sandbox())
                return
            fresh = ExecutionClient(port=client.port, host=client.host, **self._client_options())
            await fresh.connect()
            self._client = fresh
            await client.disconnect()

    async def upload(self, relpath: str, local_path: str) -> str:
        _, resources = await self.ready()
        path = self.allowed_path(local_path)
        try:
            size = await _files.upload_file(resources._connected(), relpath, path, root=self._allowed.root_of(path))
        except _beneath.SymlinkRefusedError as exc:
            raise self._allowed.refused_link(local_path, str(exc.filename)) from exc
        except FileNotFoundError as exc:
            if isinstance(exc, ResourceError):
                raise
            raise FileNotFoundError(f"File not found: {path} does not exist on the host") from exc
        except IsADirectoryError as exc:
            raise IsADirectoryError(f"{path} is a directory; upload_file copies one file") from exc
        return f"uploaded {size} bytes from {path} to /app/{relpath.lstrip('/')}"

    async def download(self, relpath: str, local_path: str) -> str:
        _, resources = await self.ready()
        path = self.allowed_path(local_path)
        try:
            size = await _files.download_file(resources._connected(), relpath, path, root=self._allowed.root_of(path))
        except _beneath.SymlinkRefusedError as exc:
            raise self._allowed.refused_link(local_path, str(exc.filename)) from exc
        return f"downloaded {size} bytes from /app/{relpath.lstrip('/')} to {path}"

    def allowed_path(self, local_path: str) -> Path:
        """`local_path` made absolute (see `AllowedDirs`), if it lies in an allowed directory with no
        symlink below it; the transfer checks again on the way, from the directory's descriptor.

        Raises:
            PathNotAllowedError: outside the allowed directories, or through a symlink; names the path.
        """
        root, path = self._allowed.find(local_path)
        try:
            directory, name = _beneath.open_parent(path, create=False, root=root)
        except _beneath.SymlinkRefusedError as exc:
            raise self._allowed.refused_link(local_path, str(exc.filename)) from exc
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return path  # missing (a download makes it) or not a directory: the transfer says so
        with directory:
            try:
                st = os.stat(name, dir_fd=directory.fd, follow_symlinks=False)
            except FileNotFoundError:
                return path
        if stat.S_ISLNK(st.st_mode):
            raise self._allowed.refused_link(local_path, str(path))
        return path

    async def _save_output(self, resources: ResourceClient, text: str) -> str:
        self._output_counter += 1
        relpath = f"{OUTPUT_DIR}/cell-{time.strftime('%Y%m%d-%H%M%S')}-{self._output_counter}.txt"
        with tempfile.TemporaryDirectory() as directory:
            local = Path(directory) / "output.txt"
            local.write_text(text, encoding="utf-8")
            await resources.upload_file(relpath, local)
        return f"/app/{relpath}"


def truncate_middle(text: str, limit: int, saved_path: str) -> str:
    """Keep the first and last `limit // 2` characters, with a marker saying what was cut and where
    the full text is."""
    head = limit // 2
    tail = limit - head
    omitted = len(text) - head - tail
    marker = f"\n\n[... {omitted:,} characters omitted; full output saved to {saved_path} ...]\n\n"
    return text[:head] + marker + text[len(text) - tail :]


def parse_key_values(pairs: list[str], what: str) -> dict[str, str]:
    """KEY=VALUE strings into a dict; ValueError names a malformed one."""
    result: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{what} {pair!r} is not KEY=VALUE")
        result[key.strip()] = value
    return result


def parse_env_file(path: Path) -> dict[str, str]:
    """A dotenv-style file: KEY=VALUE lines, blank lines and # comments ignored, optional quotes."""
    result: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :]
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{path}, line {number}: {raw!r} is not KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        result[key.strip()] = value
    return result


def parse_binds(pairs: list[str]) -> dict[str, str]:
    binds: dict[str, str] = {}
    for pair in pairs:
        host, sep, container = pair.rpartition(":")
        if not sep or not host or not container:
            raise ValueError(f"--container-bind {pair!r} is not HOST:CONTAINER")
        if container.startswith("/") or ".." in Path(container).parts:
            raise ValueError(f"--container-bind {pair!r}: the container path must be relative (it lands under /app)")
        binds[host] = container
    return binds


_CONFIG_TYPES = {"stdio": "stdio", "sse": "sse", "http": "streamable_http", "streamable-http": "streamable_http"}
_CONFIG_TYPES |= {"streamable_http": "streamable_http", "streamableHttp": "streamable_http"}
_CONFIG_KEYS = ("command", "args", "env", "cwd", "url", "headers")


def package_name(name: str, what: str) -> str:
    """`name` as a Python identifier (it names the package under /app/mcptools): `-`, `.` and spaces
    become `_` (`server-github` -> `server_github`); ValueError when that is still no identifier."""
    package = re.sub(r"[-. ]", "_", name)
    if not package.isidentifier() or keyword.iskeyword(package):
        raise ValueError(f"{what}: the server name {name!r} must be usable as a Python package name (e.g. my_server)")
    return package


def parse_tool_servers(specs: list[str], environ: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """`--tool-server NAME=COMMAND` values: stdio servers run on the host with this process's environment.

    COMMAND is split as a shell would (quotes, no expansion); ValueError names a malformed value.
    """
    environ = dict(os.environ) if environ is None else environ
    servers: dict[str, dict[str, Any]] = {}
    for spec in specs:
        name, sep, command = spec.partition("=")
        what = f"--tool-server {spec!r}"
        if not sep or not name.strip():
            raise ValueError(f"{what} is not NAME=COMMAND")
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from None
        if not argv:
            raise ValueError(f"{what} has no command after '='")
        _add_server(servers, name.strip(), {"command": argv[0], "args": argv[1:], "env": environ}, what)
    return servers


def load_tool_config(path: Path, environ: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """The servers of an MCP client configuration file, `{"mcpServers": {name: {...}}}`, to run on the host.

    Entries take `command`, `args`, `env`, `cwd` (stdio) or `url`, `headers` and `type` (`http`,
    `streamable-http`, `sse`); other keys that clients keep there are ignored, and entries with
    `"disabled": true` are left out. Stdio servers get the environment MCP clients give (the MCP
    SDK's default: PATH, HOME, ...) plus their `env`. `${VAR}` and `${VAR:-default}` in those values
    are taken from `environ` (default: this process's), as Claude Code expands `.mcp.json`, so that
    tokens stay out of the file.
    """
    environ = os.environ if environ is None else environ
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"--tool-config {path}: not JSON ({exc})") from None
    entries = config.get("mcpServers") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise ValueError(f'--tool-config {path}: expected {{"mcpServers": {{"<name>": {{...}}, ...}}}}')
    servers: dict[str, dict[str, Any]] = {}
    for name, entry in entries.items():
        what = f"--tool-config {path}, server {name!r}"
        if not isinstance(entry, dict):
            raise ValueError(f"{what}: expected an object with a command or a url")
        if entry.get("disabled") is True:
            continue
        params = {key: _expand(entry[key], environ, what) for key in _CONFIG_KEYS if key in entry}
        kind = entry.get("type")
        if kind is not None:
            if kind not in _CONFIG_TYPES:
                raise ValueError(f"{what}: unknown type {kind!r} (use stdio, http or sse)")
            params["type"] = _CONFIG_TYPES[kind]
        _add_server(servers, name, params, what)
    return servers


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(value: Any, environ: Mapping[str, str], what: str) -> Any:
    """`value` with `${VAR}` / `${VAR:-default}` replaced in every string inside it (not in keys)."""
    if isinstance(value, str):

        def variable(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in environ:
                return environ[name]
            if default is not None:
                return default
            raise ValueError(
                f"{what}: ${{{name}}} is not set in ipybox mcp's environment; set it (e.g. in the MCP client's "
                f'"env" for ipybox), or give a default: ${{{name}:-value}}'
            )

        return _VARIABLE.sub(variable, value)
    if isinstance(value, list):
        return [_expand(item, environ, what) for item in value]
    if isinstance(value, dict):
        return {key: _expand(item, environ, what) for key, item in value.items()}
    return value


def _add_server(servers: dict[str, dict[str, Any]], name: str, params: dict[str, Any], what: str) -> None:
    package = package_name(name, what)
    if package in servers:
        raise ValueError(f"{what}: a second server named {package!r}; give each server its own name")
    servers[package] = check_server_params(params, what)
