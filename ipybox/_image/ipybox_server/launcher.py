"""Starts the Kernel Gateway (8888) and the resource server (8900) in one process.

Both share tornado's asyncio loop, as does the tool service (`tools`: MCP sessions, called by kernels
over /run/ipybox/tools.sock). Once both sockets listen, a ready line goes to stdout so the host
can stop waiting without polling. Both refuse requests from foreign hosts and origins (`origin`) before
they look at the token.
"""

import asyncio
import json
import os
import sys
import time
from typing import Any

from aiohttp import web
from tornado import httputil
from tornado import web as tornado_web
from tornado.netutil import bind_unix_socket
from traitlets.config import Config

from ipybox_server import approvals, lifecycle, origin, prewarm, resource, tools

EXECUTOR_PORT = 8888
RESOURCE_PORT = 8900
READY_LINE = "IPYBOX_READY"
EXECUTOR_SOCKET = "/run/ipybox/executor.sock"
RESOURCE_SOCKET = "/run/ipybox/resource.sock"


def gateway_config(token: str) -> Config:
    config = Config()
    config.KernelGatewayApp.ip = "0.0.0.0"
    config.KernelGatewayApp.port = EXECUTOR_PORT
    config.KernelGatewayApp.port_retries = 0
    # A cap on kernels (the gateway answers 403 past it): set by the host from ExecutionContainer.
    config.KernelGatewayApp.max_kernels = int(os.environ.get("IPYBOX_MAX_KERNELS", "16"))
    config.KernelGatewayApp.auth_token = token
    # GET /api/kernels: a process that attaches to a running sandbox finds its kernels (the token
    # grants everything already; the listing tells ids, names and activity, nothing more).
    config.JupyterWebsocketPersonality.list_kernels = True
    # The gateway's default IOPub rate limits drop output (10 MB printed in one cell arrives as a
    # warning and nothing else); ipybox promises that no output is dropped silently.
    config.ZMQChannelsWebsocketConnection.limit_rate = False
    # A kernel that dies within its first 10 s would otherwise be restarted on new random ports,
    # which strands every open websocket on the old ones: the client's next cell would never run.
    config.KernelRestarter.random_ports_until_alive = False
    config.KernelGatewayApp.kernel_manager_class = "ipybox_server.kernels.PrestartingKernelManager"
    config.KernelGatewayApp.kernel_websocket_connection_class = "ipybox_server.connection.IpyboxWebsocketConnection"
    config.KernelProvisionerFactory.default_provisioner_name = prewarm.PROVISIONER_NAME
    return config


class ForbiddenHandler(tornado_web.RequestHandler):
    """Answers 403 to a request that `origin.refusal` turned away, whatever its path and method."""

    def initialize(self, reason: str) -> None:
        self.reason = reason

    def prepare(self) -> None:
        # Same body shape as the gateway's own errors (kernel_gateway.mixins.JSONErrorsMixin).
        self.set_status(403)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"reason": "Forbidden", "message": self.reason}))


def guard_gateway(web_app: tornado_web.Application, allowed_hosts: frozenset[str]) -> None:
    """Route every request with a foreign Host or Origin to `ForbiddenHandler`.

    tornado routes each request through `Application.find_handler` once its headers are in, before any
    handler exists; wrapping it covers every route, the websocket upgrade, unknown paths and OPTIONS
    preflights alike, and runs before the gateway's token check (in the handlers' `prepare`).
    """
    find_handler = web_app.find_handler

    def guarded_find_handler(request: httputil.HTTPServerRequest, **kwargs: Any) -> httputil.HTTPMessageDelegate:
        # HTTPHeaders.get joins repeated headers with commas, which `refusal` treats as malformed.
        reason = origin.refusal(request.headers.get("Host"), request.headers.get("Origin"), allowed_hosts)
        if reason is not None:
            return web_app.get_handler_delegate(request, ForbiddenHandler, {"reason": reason})
        return find_handler(request, **kwargs)

    web_app.find_handler = guarded_find_handler  # type: ignore[method-assign]


async def start_resource_server(token: str, allowed_hosts: frozenset[str], watchdog: lifecycle.Watchdog) -> None:
    runner = web.AppRunner(resource.create_app(token, allowed_hosts, watchdog), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", RESOURCE_PORT).start()
    await web.UnixSite(runner, RESOURCE_SOCKET).start()
    os.chmod(RESOURCE_SOCKET, 0o600)
    # Before the ready line: a kernel's first tool call may come with the first cell.
    await tools.start_socket()
    watchdog.ready(time.monotonic())
    print(READY_LINE, flush=True)


def listen_on_unix_socket(http_server: Any) -> None:
    """Serve the gateway on EXECUTOR_SOCKET as well as on its TCP port.

    A host client of the same machine connects to the socket through the container's root
    (/proc/<pid>/root/...), around the bridge, its firewall rules and docker-proxy: no TCP, veth or
    netfilter on the path of each message. The socket lives in /run/ipybox (0700, the sandbox user's),
    inside the container, so nothing is mounted from the host. The secret is required as on the port.
    """
    http_server.add_socket(bind_unix_socket(EXECUTOR_SOCKET, mode=0o600))


def stop_sandbox(reason: str) -> None:
    """End the sandbox: the server exits, docker-init with it, and the engine stops (and, with AutoRemove,
    removes) the container. At once, without shutting kernels down one by one: nothing in the sandbox
    outlives its container, and an owner that is gone waits for nothing."""
    print(f"ipybox_server: ending the sandbox: {reason}", flush=True)
    sys.stderr.flush()
    os._exit(0)


def main(token: str) -> None:
    from kernel_gateway.gatewayapp import KernelGatewayApp

    try:
        allowed_hosts = origin.allowed_hosts(os.environ)
    except ValueError as exc:
        raise SystemExit(f"ipybox_server: {exc}") from exc

    try:
        watchdog = lifecycle.Watchdog.from_environ(time.monotonic())
    except ValueError as exc:
        raise SystemExit(f"ipybox_server: {exc}") from exc

    prewarm.register_provisioner()

    app = KernelGatewayApp.instance(config=gateway_config(token))
    app.initialize(argv=[])
    guard_gateway(app.web_app, allowed_hosts)

    def on_resource_started(task: "asyncio.Task[None]") -> None:
        if task.exception() is not None:
            print(f"ipybox_server: resource server failed: {task.exception()!r}", file=sys.stderr)
            app.io_loop.stop()

    def schedule() -> None:
        # Runs once the loop is up; by then the gateway's socket is bound (start() binds first).
        listen_on_unix_socket(app.http_server)
        app.kernel_manager.prestart()
        approvals.use_kernel_manager(app.kernel_manager)
        task = asyncio.ensure_future(start_resource_server(token, allowed_hosts, watchdog))
        task.add_done_callback(on_resource_started)
        # Always: an unarmed watchdog only ticks, and `PUT /lifecycle` can arm it later.
        watchdog_task = asyncio.ensure_future(lifecycle.run(watchdog, app.kernel_manager, stop_sandbox))
        watchdog_tasks.add(watchdog_task)

    watchdog_tasks: set[asyncio.Task[None]] = set()  # a reference, so the task is not collected

    app.io_loop.add_callback(schedule)
    app.start()
