"""`ipybox mcp`: the sandbox as an MCP server over stdio, a thin adapter over the public API.

One sandbox (container + kernel) per server process. The MCP handshake is answered at once; the
container starts in the background and the first tool call waits for it. stdout carries only MCP
messages: logs, pull and build progress go to stderr. When the client disconnects or the process gets
SIGTERM/SIGINT, the container is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence

from mcp.server import MCPServer
from mcp.types import CallToolResult, ContentBlock, ImageContent, TextContent

from ipybox._errors import ExecutionError, IpyboxError
from ipybox._mcp_session import PathNotAllowedError, Sandbox, SandboxOptions
from ipybox.outputs import image_payloads

logger = logging.getLogger("ipybox.mcp")

SHUTDOWN_TIMEOUT = 15.0
"""Seconds a signalled server waits for the sandbox's removal before it exits anyway."""

INSTRUCTIONS = """\
ipybox runs Python in a sandboxed, stateful IPython kernel inside a Docker container.
State (variables, imports, definitions) persists between execute_ipython_cell calls until reset().
The working directory is /app; upload_file puts files there and download_file fetches them."""

EXECUTE_DESCRIPTION = """\
Run Python code in the sandbox's IPython kernel and return its output.

- State persists between calls: variables, imports and definitions stay until reset().
- Install packages with `!pip install <package>` in a cell.
- Top-level `await` works; do not call `asyncio.run` (the kernel already runs an event loop).
- The working directory is /app (uploaded files land there); files persist across calls and resets.
- Output is stdout, stderr, the last expression's value, and displayed objects; plots (e.g.
  matplotlib with plt.show()) come back as images (PNG, or JPEG as the cell made them).
- Long output is cut in the middle; the full text is saved to a file in /app/.ipybox/outputs/ (named
  in the output) that a later cell can read.
- `timeout` (seconds) interrupts a cell that runs longer, counted from when the cell starts; the
  kernel keeps its state.
"""


def tools_description(names: list[str]) -> str:
    """What the execute tool's description says about host-side MCP servers (`--tool-server`)."""
    if not names:
        return ""
    listed = ", ".join(names)
    example = names[0]
    return f"""\
- MCP servers on the host are Python packages in the sandbox: mcptools.{{{listed}}}. Call a tool as
  `from mcptools.{example}.<tool> import Params, <tool>` then `<tool>(Params(...))`; a server's tools:
  `import mcptools.{example} as s; print(s.TOOLS)`; a tool's arguments: `help(Params)`. Errors are
  `ToolError` (the tool failed) and `ToolCallError` (its base), from `mcptools.{example}`.
"""


def create_server(sandbox: Sandbox, tool_servers: Sequence[str] = ()) -> MCPServer:
    """The MCP server over `sandbox`; `tool_servers`: the names of its host-side MCP servers (`--tool-server`)."""
    server = MCPServer(name="ipybox", instructions=INSTRUCTIONS)

    @server.tool(description=EXECUTE_DESCRIPTION + tools_description(list(tool_servers)))
    async def execute_ipython_cell(
        code: str, timeout: float = 120, max_output_chars: int | None = None
    ) -> CallToolResult:
        if max_output_chars is not None and max_output_chars < 1:
            return _error("max_output_chars must be at least 1")
        try:
            result = await sandbox.execute(code, timeout, max_output_chars)
        except ExecutionError as exc:
            return _error(f"{exc.message}\n{exc.trace or ''}".rstrip())
        except TimeoutError as exc:
            return _error(str(exc))
        except (IpyboxError, RuntimeError) as exc:
            return _error(str(exc))
        content: list[ContentBlock] = [TextContent(type="text", text=result.text or "(no output)")]
        # Each image as the kernel sent it (PNG, or JPEG with its own type): never decoded here.
        for mime, data in image_payloads(result.outputs):
            content.append(ImageContent(type="image", data=data, mime_type=mime))
        return CallToolResult(content=content)

    @server.tool(
        description="Upload a host file into the sandbox at /app/<relpath> (parent directories are created). "
        "local_path must lie in one of the directories the server allows (--allowed-dir); no symbolic link "
        "below them is followed."
    )
    async def upload_file(relpath: str, local_path: str) -> CallToolResult:
        return await _file_call(sandbox.upload(relpath, local_path))

    @server.tool(
        description="Download the sandbox file /app/<relpath> to a host path. local_path must lie in one of "
        "the directories the server allows (--allowed-dir), with no symbolic link below them; parent "
        "directories are created."
    )
    async def download_file(relpath: str, local_path: str) -> CallToolResult:
        return await _file_call(sandbox.download(relpath, local_path))

    @server.tool(
        description="Restart the kernel: variables, imports and definitions are gone; files in /app and "
        "installed packages stay. With new_sandbox=true, the whole sandbox is replaced by a fresh one instead "
        "(files, installed packages and state are all gone). Waits for a running cell to finish."
    )
    async def reset(new_sandbox: bool = False) -> CallToolResult:
        try:
            await sandbox.reset(new_sandbox)
        except (IpyboxError, RuntimeError) as exc:
            return _error(str(exc))
        text = (
            "new sandbox: files, packages, variables and imports are gone"
            if new_sandbox
            else "kernel reset: variables and imports are gone; files stay"
        )
        return CallToolResult(content=[TextContent(type="text", text=text)])

    return server


async def _file_call(call: object) -> CallToolResult:
    try:
        text = await call  # type: ignore[misc]
    except (PathNotAllowedError, OSError, IpyboxError, RuntimeError) as exc:
        return _error(str(exc))
    return CallToolResult(content=[TextContent(type="text", text=str(text))])


def _error(text: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=text)], is_error=True)


async def serve(options: SandboxOptions, build_if_missing: bool = True) -> None:
    """Serve MCP over stdio until the client disconnects or SIGTERM/SIGINT; always remove the sandbox."""
    from ipybox._run import image_present

    def build(tag: str) -> None:
        # Runs in a worker thread at start-up, when the image is missing: progress on stderr.
        if asyncio.run(image_present(tag)):
            return
        from ipybox._build import default_base_image
        from ipybox.build_cli import build_command

        logger.warning("image %s not found; building it (first use)", tag)
        try:
            build_command(tag, None, False, default_base_image())
        except SystemExit as exc:  # typer.Exit: the build printed its error on stderr
            raise RuntimeError(f"building image {tag} failed (see the server's stderr)") from exc
        except Exception as exc:
            if type(exc).__name__ == "Exit":
                raise RuntimeError(f"building image {tag} failed (see the server's stderr)") from exc
            raise

    sandbox = Sandbox(options, build=build if build_if_missing else None)
    server = create_server(sandbox, list(options.tool_servers))
    loop = asyncio.get_running_loop()
    shutdown: list[asyncio.Task[None]] = []

    async def remove_and_exit() -> None:
        logger.info("signal received; removing the sandbox")
        try:
            await asyncio.wait_for(sandbox.close(), SHUTDOWN_TIMEOUT)
        finally:
            # The SDK reads stdin on a worker thread that cannot be cancelled, so an orderly return
            # from run_stdio_async could wait forever for input: leave once the sandbox is gone.
            os._exit(0)

    def on_signal() -> None:
        if not shutdown:
            shutdown.append(loop.create_task(remove_and_exit()))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    sandbox.start()
    try:
        await server.run_stdio_async()  # returns when the client closes stdin
    finally:
        await asyncio.shield(sandbox.close())
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def run(options: SandboxOptions) -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="ipybox mcp: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(options))
