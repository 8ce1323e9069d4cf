"""Starts the Kernel Gateway (8888) and the resource server (8900) in one process.

Both share tornado's asyncio loop. Once both sockets listen, a ready line goes to stdout so the host
can stop waiting without polling.
"""

import asyncio
import sys

from aiohttp import web
from traitlets.config import Config

from ipybox_server import prewarm, resource

EXECUTOR_PORT = 8888
RESOURCE_PORT = 8900
READY_LINE = "IPYBOX_READY"


def gateway_config(token: str) -> Config:
    config = Config()
    config.KernelGatewayApp.ip = "0.0.0.0"
    config.KernelGatewayApp.port = EXECUTOR_PORT
    config.KernelGatewayApp.port_retries = 0
    config.KernelGatewayApp.auth_token = token
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


async def start_resource_server(token: str) -> None:
    runner = web.AppRunner(resource.create_app(token), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", RESOURCE_PORT).start()
    print(READY_LINE, flush=True)


def main(token: str) -> None:
    from kernel_gateway.gatewayapp import KernelGatewayApp

    prewarm.register_provisioner()

    app = KernelGatewayApp.instance(config=gateway_config(token))
    app.initialize(argv=[])

    def on_resource_started(task: "asyncio.Task[None]") -> None:
        if task.exception() is not None:
            print(f"ipybox_server: resource server failed: {task.exception()!r}", file=sys.stderr)
            app.io_loop.stop()

    def schedule() -> None:
        # Runs once the loop is up; by then the gateway's socket is bound (start() binds first).
        app.kernel_manager.prestart()
        task = asyncio.ensure_future(start_resource_server(token))
        task.add_done_callback(on_resource_started)

    app.io_loop.add_callback(schedule)
    app.start()
