"""The `ipybox` command line: build, run, cleanup, ps, pause, resume, snapshot, mcp."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from ipybox._errors import ExecutionError, ImageNotFoundError, IpyboxError

if TYPE_CHECKING:
    from ipybox._swarm import Swarm

app = typer.Typer(
    name="ipybox",
    help="A secure, fast Python code-execution sandbox for AI agents.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Diagnostics go to stderr; stdout carries only the sandbox's output.
err = Console(stderr=True, soft_wrap=True)

TagOption = Annotated[str, typer.Option("-t", "--tag", help="Name and optionally tag of the image (name:tag).")]


@app.command()
def build(
    tag: TagOption = "gradion-ai/ipybox",
    dependencies: Annotated[
        Path | None,
        typer.Option(
            "-d",
            "--dependencies",
            help="Extra Python packages: requirements.txt lines or pyproject array lines.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    root: Annotated[bool, typer.Option("-r", "--root", help="Build an image whose processes run as root.")] = False,
    base_image: Annotated[
        str | None,
        typer.Option(
            "--base-image",
            help="Debian-based image to build on [default: $IPYBOX_BASE_IMAGE or debian:bookworm-slim]. "
            "When it can be neither found nor pulled, a Debian base is made with debootstrap.",
        ),
    ] = None,
) -> None:
    """Build an ipybox image."""
    from ipybox._build import default_base_image
    from ipybox.build_cli import build_command

    build_command(tag, dependencies, root, base_image or default_base_image())


OwnerBoundOption = Annotated[
    bool,
    typer.Option(
        "--owner-bound/--no-owner-bound",
        help="Remove the sandbox when this process dies, even by SIGKILL (it holds a lease on the sandbox).",
    ),
]


@app.command()
def run(
    code: Annotated[str | None, typer.Argument(help="Python code to run.")] = None,
    file: Annotated[
        Path | None, typer.Option("-f", "--file", help="Run the code in this file.", exists=True, dir_okay=False)
    ] = None,
    tag: TagOption = "gradion-ai/ipybox",
    timeout: Annotated[float, typer.Option(help="Seconds the code may run.")] = 120,
    images_dir: Annotated[
        Path, typer.Option("--images-dir", help="Where images the code displays are saved as PNG files.")
    ] = Path("."),
    owner_bound: OwnerBoundOption = True,
) -> None:
    """Run code in a fresh sandbox, print its output and save its images.

    The default image is built on first use.
    """
    if (code is None) == (file is None):
        err.print("[red]error:[/] give either CODE or -f FILE")
        raise typer.Exit(2)
    source = code if code is not None else file.read_text()  # type: ignore[union-attr]
    from ipybox._run import image_present, run_code

    try:
        if not asyncio.run(image_present(tag)):
            err.print(f"ipybox: image {tag} not found; building it now (first use)")
            build(tag=tag, dependencies=None, root=False, base_image=None)
        result = asyncio.run(run_code(source, tag=tag, timeout=timeout, owner_bound=owner_bound))
    except ExecutionError as exc:
        err.print(exc.trace or exc.message, markup=False, highlight=False)
        raise typer.Exit(1) from None
    except ImageNotFoundError as exc:
        err.print(f"[red]error:[/] {exc}", markup=True, highlight=False)
        raise typer.Exit(1) from None
    except (IpyboxError, TimeoutError) as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    if result.text is not None:
        sys.stdout.write(result.text + "\n")
    if result.images:
        images_dir.mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(result.images, start=1):
            path = _free_path(images_dir, f"ipybox-image-{index}.png")
            image.save(path)
            err.print(f"saved image {index} to {path}")


SwarmOption = Annotated[
    str | None,
    typer.Option(
        "--swarm",
        metavar="MANAGER_URL",
        help="A Docker Swarm instead of the local engine, by its manager's engine API (tcp://10.0.0.2:2375).",
    ),
]
NodeEngineOption = Annotated[
    list[str] | None,
    typer.Option(
        "--node-engine",
        metavar="NAME=URL",
        help="With --swarm: the engine API of a node by hostname or node id (repeatable); "
        "by default tcp://NODE_ADDRESS:2375.",
    ),
]


def _swarm_backend(swarm: str | None, node_engine: list[str] | None) -> Swarm | None:
    """The `Swarm` of `--swarm`/`--node-engine`, None for the local engine; usage errors exit 2."""
    if swarm is None:
        if node_engine:
            err.print("[red]error:[/] --node-engine needs --swarm MANAGER_URL", highlight=False)
            raise typer.Exit(2)
        return None
    from ipybox._swarm import Swarm

    try:
        return Swarm(swarm, _node_engines(node_engine))
    except ValueError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None


def _node_engines(items: list[str] | None) -> dict[str, str]:
    engines: dict[str, str] = {}
    for item in items or []:
        name, sep, url = item.partition("=")
        if not sep or not name or not url:
            err.print(f"[red]error:[/] --node-engine {item!r}: give NAME=URL (node2=tcp://10.0.0.4:2375)")
            raise typer.Exit(2)
        engines[name] = url
    return engines


@app.command()
def cleanup(
    ancestor: Annotated[
        str | None,
        typer.Option("-a", "--ancestor", help="Remove the containers created from this image instead."),
    ] = None,
    stale: Annotated[
        bool,
        typer.Option(
            "--stale",
            help="Only sandboxes past their max lifetime, or whose owner process is gone (paused ones included).",
        ),
    ] = False,
    swarm: Annotated[
        str | None,
        typer.Option(
            "--swarm",
            metavar="MANAGER_URL",
            help="Clean up a Docker Swarm instead of the local engine: remove every ipybox sandbox service, "
            "then the leftover task containers on every node that is up (tcp://10.0.0.2:2375).",
        ),
    ] = None,
    node_engine: NodeEngineOption = None,
    label: Annotated[
        list[str] | None,
        typer.Option(
            "--label",
            metavar="KEY=VALUE",
            help="With --swarm: only sandboxes that also carry this label (repeatable).",
        ),
    ] = None,
) -> None:
    """Remove ipybox containers (all labelled as ipybox's, or those of one image), or a swarm's sandboxes."""
    if swarm is None:
        if node_engine or label:
            err.print("[red]error:[/] --node-engine and --label need --swarm MANAGER_URL", highlight=False)
            raise typer.Exit(2)
        from ipybox._cleanup import remove_containers

        try:
            removed = asyncio.run(remove_containers(ancestor, stale=stale))
        except IpyboxError as exc:
            err.print(f"[red]error:[/] {exc}", highlight=False)
            raise typer.Exit(1) from None
        err.print(f"removed {len(removed)} container(s)")
        return
    if ancestor is not None or stale:
        err.print("[red]error:[/] --ancestor and --stale do not apply to --swarm", highlight=False)
        raise typer.Exit(2)
    from ipybox._cleanup import clean_swarm

    engines = _node_engines(node_engine)
    try:
        services, containers = asyncio.run(clean_swarm(swarm, engines, list(label or [])))
    except (IpyboxError, ValueError) as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    for name in services:
        err.print(f"removed service {name}", highlight=False)
    for node, container_id in containers:
        err.print(f"removed leftover container {container_id[:12]} on node {node}", highlight=False)
    err.print(f"removed {len(services)} service(s) and {len(containers)} leftover container(s)")


@app.command()
def ps(
    all_states: Annotated[bool, typer.Option("-a", "--all", help="Show stopped sandboxes too.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array on stdout, for scripts.")] = False,
    swarm: SwarmOption = None,
    node_engine: NodeEngineOption = None,
) -> None:
    """List ipybox sandboxes: id, name, image, age, idle time, memory, state, kernels (and node, on a swarm).

    Idle time and kernels are shown for running sandboxes this user started (their secret is needed
    to ask the gateway); memory is read from the container's cgroup where this host can (not for a
    swarm node's or another machine's containers).
    """
    import json

    from ipybox._attach import list_sandboxes, list_swarm_sandboxes, table

    backend = _swarm_backend(swarm, node_engine)
    try:
        if backend is None:
            rows = asyncio.run(list_sandboxes(all_states))
        else:
            rows = asyncio.run(list_swarm_sandboxes(backend, all_states))
    except IpyboxError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    if as_json:
        sys.stdout.write(json.dumps([row.to_json() for row in rows], indent=2) + "\n")
    else:
        sys.stdout.write(table(rows) + "\n")


SandboxArgument = Annotated[
    str,
    typer.Argument(
        help="Container id (or a unique prefix) or name of the sandbox; with --swarm also its service name or id."
    ),
]


@app.command()
def pause(sandbox: SandboxArgument, swarm: SwarmOption = None, node_engine: NodeEngineOption = None) -> None:
    """Pause a sandbox: freeze its processes, keep its memory and kernels (`ipybox resume` thaws it)."""
    _set_paused(sandbox, True, _swarm_backend(swarm, node_engine))


@app.command()
def resume(sandbox: SandboxArgument, swarm: SwarmOption = None, node_engine: NodeEngineOption = None) -> None:
    """Resume a paused sandbox; its clients continue where they were."""
    _set_paused(sandbox, False, _swarm_backend(swarm, node_engine))


def _set_paused(sandbox: str, paused: bool, backend: Swarm | None) -> None:
    from ipybox._attach import set_paused

    try:
        container_id = asyncio.run(set_paused(sandbox, paused, backend))
    except IpyboxError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    err.print(f"{'paused' if paused else 'resumed'} {container_id[:12]}", highlight=False)


snapshot_app = typer.Typer(help="Snapshots on this host: take one of a running sandbox, list them, delete them.")
app.add_typer(snapshot_app, name="snapshot")
DirectoryOption = Annotated[
    Path | None,
    typer.Option("--dir", help="The snapshots' directory [default: ~/.local/share/ipybox/snapshots]."),
]


@snapshot_app.command("take")
def snapshot_take(
    sandbox: SandboxArgument,
    path: Annotated[Path | None, typer.Option("--path", help="The new snapshot's directory (must not exist).")] = None,
    swarm: SwarmOption = None,
    node_engine: NodeEngineOption = None,
) -> None:
    """Snapshot a running sandbox this user started: its /app and every kernel's namespace. The sandbox
    keeps running; the snapshot's path goes to stdout, what could not be captured to stderr."""
    from ipybox.container import ExecutionContainer

    backend = _swarm_backend(swarm, node_engine)

    async def take() -> Path:
        container = await ExecutionContainer.attach(sandbox, backend=backend)
        try:
            made = await container.snapshot(path)
        finally:
            await container.detach()
        for name, why in made.skipped.items():
            err.print(f"not captured: {name}: {why}", highlight=False)
        return made.path

    try:
        sys.stdout.write(f"{asyncio.run(take())}\n")
    except IpyboxError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None


@snapshot_app.command("ls")
def snapshot_ls(
    directory: DirectoryOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array on stdout, for scripts.")] = False,
) -> None:
    """List the snapshots that verify (seal and sizes), oldest first: id, created, image, kernels, size."""
    import json

    from ipybox.snapshot import list_snapshots

    found = list_snapshots(directory)
    if as_json:
        rows = [
            {
                "id": snap.id,
                "path": str(snap.path),
                "created": snap.created,
                "image": snap.image,
                "kernels": len(snap.kernels),
                "size": snap.size,
                "skipped": snap.skipped,
            }
            for snap in found
        ]
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    lines = [f"{'ID':<40} {'CREATED':<26} {'IMAGE':<28} {'KERNELS':>7} {'SIZE':>10}"]
    for snap in found:
        size = f"{snap.size / 1e6:.1f} MB"
        lines.append(
            f"{snap.id:<40} {snap.created:<26} {snap.image.get('tag', ''):<28} {len(snap.kernels):>7} {size:>10}"
        )
    sys.stdout.write("\n".join(lines) + "\n")


@snapshot_app.command("rm")
def snapshot_rm(
    snapshots: Annotated[list[str], typer.Argument(help="Snapshot ids (from `ipybox snapshot ls`) or paths.")],
    directory: DirectoryOption = None,
) -> None:
    """Delete snapshots. An id or path that is not a snapshot is an error (nothing else is deleted)."""
    from ipybox import _snapshot_format
    from ipybox.snapshot import Snapshot

    root = directory if directory is not None else _snapshot_format.default_directory()
    targets = []
    for name in snapshots:
        path = Path(name) if Path(name).is_dir() else root / name
        if not (path / _snapshot_format.MANIFEST).is_file():
            err.print(f"[red]error:[/] {name}: no snapshot there (see `ipybox snapshot ls`); nothing deleted")
            raise typer.Exit(1)
        targets.append(path)
    for path in targets:
        Snapshot(path, {}).delete()
        err.print(f"deleted {path}", highlight=False)


@app.command()
def mcp(
    allowed_dir: Annotated[
        list[Path] | None,
        typer.Option("--allowed-dir", help="Host directory upload/download may use (repeatable) [default: cwd]."),
    ] = None,
    allowed_domain: Annotated[
        list[str] | None,
        typer.Option("--allowed-domain", help="Turns the firewall on: a domain, IPv4 address or CIDR (repeatable)."),
    ] = None,
    container_tag: Annotated[str, typer.Option("--container-tag", help="Image of the sandbox.")] = "gradion-ai/ipybox",
    container_env_var: Annotated[
        list[str] | None, typer.Option("--container-env-var", help="KEY=VALUE for the sandbox (repeatable).")
    ] = None,
    container_env_file: Annotated[
        Path | None, typer.Option("--container-env-file", help="File of KEY=VALUE lines for the sandbox.")
    ] = None,
    container_bind: Annotated[
        list[str] | None,
        typer.Option("--container-bind", help="HOST:CONTAINER bind mount, CONTAINER relative to /app (repeatable)."),
    ] = None,
    container_label: Annotated[
        list[str] | None, typer.Option("--container-label", help="KEY=VALUE label on the container (repeatable).")
    ] = None,
    memory_limit: Annotated[str | None, typer.Option(help="Memory limit of the sandbox, e.g. 4g.")] = "4g",
    cpu_limit: Annotated[float | None, typer.Option(help="CPUs the sandbox may use.")] = None,
    pids_limit: Annotated[int | None, typer.Option(help="Process/thread limit of the sandbox.")] = 1024,
    max_output_chars: Annotated[
        int, typer.Option(help="Cell output beyond this is cut in the middle (full text saved in the sandbox).")
    ] = 20_000,
    pool: Annotated[
        int,
        typer.Option(
            help="Spare sandboxes kept started (a SandboxPool), so reset(new_sandbox=true) switches to a fresh "
            "sandbox at once. Each spare uses about 90 MiB of memory."
        ),
    ] = 0,
    tool_server: Annotated[
        list[str] | None,
        typer.Option(
            "--tool-server",
            help="NAME=COMMAND: an MCP stdio server run on the host, with this process's environment; code in the "
            "sandbox calls its tools as `from mcptools.NAME.<tool> import Params, <tool>` (repeatable). Its "
            "environment and credentials never enter the sandbox.",
        ),
    ] = None,
    tool_config: Annotated[
        Path | None,
        typer.Option(
            "--tool-config",
            help='JSON file {"mcpServers": {NAME: {command, args, env} or {url, headers}}} as MCP clients write '
            "it: more host-side servers, as --tool-server.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    allow_call: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-call",
            help="Turns approvals on: the code may make only the MCP tool calls and shell escapes that match "
            "(server.tool or server, wildcards; shell, shell.system for !cmd, shell.%%bash); others raise "
            "ToolDenied / ShellEscapeDenied in the cell (repeatable) [default: all run].",
        ),
    ] = None,
    owner_bound: OwnerBoundOption = True,
) -> None:
    """Serve the sandbox as an MCP server over stdio (for Claude Desktop, Claude Code, Cursor, ...)."""
    from ipybox import mcp_server
    from ipybox._limits import parse_memory
    from ipybox._mcp_session import (
        SandboxOptions,
        load_tool_config,
        parse_binds,
        parse_env_file,
        parse_key_values,
        parse_tool_servers,
    )

    try:
        directories = [directory.expanduser().resolve() for directory in (allowed_dir or [Path.cwd()])]
        for directory in directories:
            if not directory.is_dir():
                raise ValueError(f"--allowed-dir {directory} is not an existing directory")
        env = parse_env_file(container_env_file) if container_env_file else {}
        env.update(parse_key_values(container_env_var or [], "--container-env-var"))
        if max_output_chars < 1:
            raise ValueError("--max-output-chars must be at least 1")
        if pool < 0:
            raise ValueError("--pool must be 0 (no pool) or more")
        parse_memory(memory_limit)
        if cpu_limit is not None and cpu_limit <= 0:
            raise ValueError("--cpu-limit must be positive")
        if pids_limit is not None and pids_limit <= 0:
            raise ValueError("--pids-limit must be positive")
        if allowed_domain:
            from ipybox._firewall import parse_entries

            parse_entries(allowed_domain)
        if allow_call:
            from ipybox.approvals import AllowList

            AllowList(allow_call)  # a bad pattern is a usage error now, not a failed start later
        tool_servers = load_tool_config(tool_config) if tool_config else {}
        for name, params in parse_tool_servers(tool_server or []).items():
            if name in tool_servers:
                raise ValueError(f"--tool-server {name}: a server of that name is in --tool-config {tool_config} too")
            tool_servers[name] = params
        options = SandboxOptions(
            tag=container_tag,
            allowed_dirs=directories,
            allowed_domains=allowed_domain or None,
            env=env,
            binds=parse_binds(container_bind or []),
            labels=parse_key_values(container_label or [], "--container-label"),
            memory_limit=memory_limit,
            cpu_limit=cpu_limit,
            pids_limit=pids_limit,
            max_output_chars=max_output_chars,
            pool=pool,
            tool_servers=tool_servers,
            owner_bound=owner_bound,
            allowed_calls=allow_call or None,
        )
    except (ValueError, OSError) as exc:
        err.print(f"error: {exc}", markup=False, highlight=False)
        raise typer.Exit(2) from None
    mcp_server.run(options)


def _free_path(directory: Path, name: str) -> Path:
    path = directory / name
    stem, counter = path.stem, 1
    while path.exists():
        counter += 1
        path = directory / f"{stem}-{counter}.png"
    return path


def main() -> None:
    # Usage errors as one line on stderr (exit 2), not a framed box: `ipybox mcp` is started by MCP
    # clients whose logs show stderr line by line.
    try:
        # Without standalone mode, click returns a command's exit code instead of exiting.
        code = app(standalone_mode=False)
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:
        raise SystemExit(1) from None
    except Exception as exc:
        # typer's (vendored) click.UsageError: exit code 2 and a message; not exported by typer.
        if getattr(exc, "exit_code", None) != 2 or not hasattr(exc, "format_message"):
            raise
        err.print(f"error: {' '.join(exc.format_message().split())}", markup=False, highlight=False)
        raise SystemExit(2) from None
    raise SystemExit(code if isinstance(code, int) else 0)
