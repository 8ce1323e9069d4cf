"""The control plane's input checks, on every route of both ports, with raw HTTP requests.

- Authentication: no token, a wrong token and another sandbox's valid token are refused (401/403).
- DNS rebinding and foreign origins: a foreign `Origin` or `Host` header is refused with 403, before the
  token is looked at; `Host: localhost:<port>` and `Host: 127.0.0.1:<port>` are served.
- Output that imitates the Jupyter protocol comes back as text and never ends an execution early.

Requests always go to 127.0.0.1; Host headers are set explicitly, so no name is ever resolved.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest

from ipybox import ExecutionClient, ExecutionContainer, ResourceClient, _tokens, _wire
from tests.integration.conftest import TEST_IMAGE, session_labels

EVIL = "evil.example"


@dataclass(frozen=True)
class Route:
    port: str  # "executor" or "resource"
    method: str
    path: str  # "{kernel}" is replaced by a live kernel's id
    ok: int | None = None  # the status with the right token; None: not requested with the right token
    websocket: bool = False

    def __str__(self) -> str:
        return f"{self.port}:{self.method}:{self.path}"


RESOURCE_ROUTES = [
    Route("resource", "GET", "/status", ok=200),
    Route("resource", "PUT", "/files/x.txt", ok=200),
    Route("resource", "GET", "/files/x.txt", ok=200),
    Route("resource", "DELETE", "/files/x.txt"),
    Route("resource", "PUT", "/directories/d"),
    Route("resource", "GET", "/directories/d", ok=200),
    Route("resource", "GET", "/modules?name=json", ok=200),
    Route("resource", "GET", "/mcp/sources?server_name=nothing", ok=404),
    Route("resource", "POST", "/mcp/sources"),
    Route("resource", "GET", "/no-such-route", ok=404),
]
EXECUTOR_ROUTES = [
    Route("executor", "GET", "/api", ok=200),
    Route("executor", "GET", "/api/kernels", ok=200),  # listing is on (attach, ps): the token grants it
    Route("executor", "POST", "/api/kernels"),
    Route("executor", "GET", "/api/kernelspecs", ok=200),
    Route("executor", "GET", "/api/kernels/{kernel}", ok=200),
    Route("executor", "POST", "/api/kernels/{kernel}/interrupt", ok=204),
    Route("executor", "POST", "/api/kernels/{kernel}/restart"),
    Route("executor", "DELETE", "/api/kernels/{kernel}"),
    Route("executor", "OPTIONS", "/api/kernels"),
    Route("executor", "GET", "/api/kernels/{kernel}/channels", ok=101, websocket=True),
    Route("executor", "GET", "/no-such-route", ok=404),
]
ROUTES = RESOURCE_ROUTES + EXECUTOR_ROUTES
# The gateway answers OPTIONS (CORS preflights) and unknown paths (404) without a token; the origin check
# still applies to both.
TOKEN_ROUTES = [
    route for route in ROUTES if route.port == "resource" or (route.method != "OPTIONS" and route.ok != 404)
]


@dataclass
class Target:
    """The sandbox under test, one live kernel in it, and another sandbox's secret."""

    container: ExecutionContainer
    kernel_id: str
    other_token: str

    def port(self, route: Route) -> int:
        return self.container.executor_port if route.port == "executor" else self.container.resource_port

    @property
    def token(self) -> str:
        token = _tokens.lookup("localhost", self.container.executor_port)
        assert token
        return token


@pytest.fixture(scope="module")
async def other_container() -> AsyncIterator[ExecutionContainer]:
    async with ExecutionContainer(tag=TEST_IMAGE, labels=session_labels()) as container:
        yield container


@pytest.fixture(scope="module")
async def target(shared_container: ExecutionContainer, other_container: ExecutionContainer) -> AsyncIterator[Target]:
    other_token = _tokens.lookup("localhost", other_container.executor_port)
    assert other_token and other_token != _tokens.lookup("localhost", shared_container.executor_port)
    async with ExecutionClient(port=shared_container.executor_port) as client:
        assert client.kernel_id
        # What the GET routes read with the right token (cwd of the kernel is /app).
        await client.execute("import os\nopen('x.txt', 'w').write('x')\nos.makedirs('d', exist_ok=True)")
        yield Target(shared_container, client.kernel_id, other_token)


async def send(
    target: Target, route: Route, headers: dict[str, str], query: str = ""
) -> tuple[int, dict[str, object] | None]:
    """Send the route's request to 127.0.0.1 with exactly these headers; return the status and JSON body."""
    path = route.path.replace("{kernel}", target.kernel_id)
    if query:
        path += ("&" if "?" in path else "?") + query
    url = f"http://127.0.0.1:{target.port(route)}{path}"
    async with aiohttp.ClientSession() as session:
        if route.websocket:
            try:
                ws = await session.ws_connect(url, headers=headers, protocols=(_wire.V1_PROTOCOL,))
            except aiohttp.WSServerHandshakeError as exc:
                return exc.status, None
            await ws.close()
            return 101, None
        body = b"{}" if route.method in ("PUT", "POST") else None
        async with session.request(route.method, url, headers=headers, data=body) as response:
            try:
                payload = await response.json(content_type=None)
            except ValueError:
                payload = None
            return response.status, payload if isinstance(payload, dict) else None


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"token {token}"}


# --- authentication ------------------------------------------------------------------------------


@pytest.mark.parametrize("route", TOKEN_ROUTES, ids=str)
@pytest.mark.parametrize("credential", ["missing", "wrong", "other-sandbox", "wrong-query", "other-sandbox-query"])
async def test_route_refuses_bad_credentials(target: Target, route: Route, credential: str) -> None:
    headers, query = {}, ""
    if credential == "wrong":
        headers = auth("wrong")
    elif credential == "other-sandbox":
        headers = auth(target.other_token)
    elif credential == "wrong-query":
        query = "token=wrong"
    elif credential == "other-sandbox-query":
        query = f"token={target.other_token}"
    status, _ = await send(target, route, headers, query)
    assert status in (401, 403)


@pytest.mark.parametrize("route", RESOURCE_ROUTES, ids=str)
async def test_resource_port_ignores_a_token_in_the_query(target: Target, route: Route) -> None:
    status, body = await send(target, route, {}, f"token={target.token}")
    assert status == 401
    assert body == {"error": "missing or invalid token"}


# --- DNS rebinding and foreign origins -----------------------------------------------------------


FOREIGN = {
    "foreign-origin": {"Origin": f"http://{EVIL}"},
    "foreign-origin-with-port": {"Origin": f"http://{EVIL}:8888"},
    "null-origin": {"Origin": "null"},
    "foreign-host": {"Host": EVIL},
    "foreign-host-with-port": {"Host": f"{EVIL}:8888"},
    "rebinding": {"Host": f"{EVIL}:8888", "Origin": f"http://{EVIL}:8888"},
    "local-host-foreign-origin": {"Host": "localhost", "Origin": f"https://{EVIL}"},
}


@pytest.mark.parametrize("route", ROUTES, ids=str)
@pytest.mark.parametrize("headers", FOREIGN.values(), ids=FOREIGN.keys())
@pytest.mark.parametrize("with_token", [True, False], ids=["token", "no-token"])
async def test_foreign_host_or_origin_is_refused_before_auth(
    target: Target, route: Route, headers: dict[str, str], with_token: bool
) -> None:
    status, body = await send(target, route, {**headers, **(auth(target.token) if with_token else {})})
    assert status == 403
    if route.websocket:
        return
    # The body comes from the origin check, not from the token check: it ran first.
    assert body is not None
    message = body["error"] if route.port == "resource" else body["message"]
    assert "not allowed" in str(message)
    if route.port == "resource":
        assert set(body) == {"error"}


@pytest.mark.parametrize("route", [route for route in ROUTES if route.ok is not None], ids=str)
@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", None])
@pytest.mark.parametrize("origin", [None, "local"])
async def test_local_host_and_origin_are_served(
    target: Target, route: Route, host: str | None, origin: str | None
) -> None:
    port = target.port(route)
    headers = auth(target.token)
    if host is not None:
        headers["Host"] = f"{host}:{port}"
    if origin is not None:
        headers["Origin"] = f"http://{host or '127.0.0.1'}:{port}"
    status, body = await send(target, route, headers)
    assert status == route.ok
    assert "not allowed" not in json.dumps(body)


# --- the clients keep working ---------------------------------------------------------------------


async def test_clients_still_work(shared_container: ExecutionContainer) -> None:
    for host in ("localhost", "127.0.0.1"):
        async with ExecutionClient(port=shared_container.executor_port, host=host) as client:
            assert (await client.execute("print(6 * 7)")).text == "42"
        async with ResourceClient(port=shared_container.resource_port, host=host) as resources:
            assert (await resources.status())["status"] == "ok"
            assert "json" in await resources.get_module_sources(["json"])


# --- output that imitates the protocol ----------------------------------------------------------

FAKE_IDLE_CELL = """
import json, sys, time
parent = get_ipython().kernel.get_parent()["header"]["msg_id"]
fake = {
    "header": {"msg_id": "fake", "msg_type": "status", "session": "", "username": "", "date": "",
               "version": "5.3"},
    "msg_id": "fake",
    "msg_type": "status",
    "parent_header": {"msg_id": parent, "msg_type": "execute_request"},
    "metadata": {},
    "content": {"execution_state": "idle"},
    "channel": "iopub",
}
print(json.dumps(fake))
print(json.dumps(fake), file=sys.stderr)
sys.stdout.flush(); sys.stderr.flush()
time.sleep(1)
print("after the fake idle")
"""


async def test_fake_json_message_is_text_and_does_not_end_the_execution(client: ExecutionClient) -> None:
    execution = await client.submit(FAKE_IDLE_CELL)
    result = await execution.result(timeout=30)
    assert result.text is not None
    lines = result.text.splitlines()
    assert lines[-1] == "after the fake idle"
    fakes = [json.loads(line) for line in lines[:-1]]
    assert len(fakes) == 2
    for fake in fakes:
        # The fake names the very request that was running; it was still delivered as text.
        assert fake["parent_header"]["msg_id"] == execution.msg_id
        assert fake["content"] == {"execution_state": "idle"}
    assert result.images == []
    assert (await client.execute("print('next')")).text == "next"


async def test_fake_idle_for_another_execution_is_text(client: ExecutionClient) -> None:
    waiting = await client.submit("import time; time.sleep(1.5); print('first done')")
    fake = json.dumps(
        {
            "header": {"msg_type": "status"},
            "msg_type": "status",
            "parent_header": {"msg_id": waiting.msg_id},
            "content": {"execution_state": "idle"},
            "channel": "iopub",
        }
    )
    # Queued behind the first; its text names the first execution's id.
    second = await client.submit(f"print({fake!r})")
    assert (await waiting.result(timeout=30)).text == "first done"
    assert (await second.result(timeout=30)).text == fake


async def test_fake_v1_frame_is_text(client: ExecutionClient) -> None:
    frame = _wire.encode_v1(
        "iopub",
        {
            "header": {"msg_id": "fake", "msg_type": "status"},
            "parent_header": {"msg_id": "fake"},
            "metadata": {},
            "content": {"execution_state": "idle"},
        },
    )
    code = (
        f"import sys, time\nsys.stdout.write({frame.decode('latin-1')!r})\nsys.stdout.flush()\n"
        "time.sleep(0.5)\nprint()\nprint('end')"
    )
    result = await client.execute(code, timeout=30)
    assert result.text is not None
    assert result.text.endswith("\nend")
    assert '{"execution_state": "idle"}' in result.text
    assert "iopub" in result.text
    assert result.images == []


FAKE_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


async def test_fake_image_data_is_text(client: ExecutionClient) -> None:
    uri = f"data:image/png;base64,{FAKE_PNG}"
    fake_display = json.dumps(
        {"msg_type": "display_data", "content": {"data": {"image/png": FAKE_PNG}, "metadata": {}}, "channel": "iopub"}
    )
    code = (
        f"print({uri!r})\n"
        f"print({fake_display!r})\n"
        f"from IPython.display import display\n"
        f"display({{'text/plain': {uri!r}}}, raw=True)\n"
        f"{FAKE_PNG!r}"
    )
    result = await client.execute(code, timeout=30)
    assert result.images == []
    assert result.text is not None
    assert result.text.splitlines() == [uri, fake_display, uri, repr(FAKE_PNG)]


ESCAPES = "before \x1b]0;title\x07 \x1b[31mred\x1b[0m \x1b]8;;http://evil.example\x1b\\link\x1b]8;;\x1b\\ after"


async def test_escape_sequences_do_not_disturb_the_protocol(client: ExecutionClient) -> None:
    result = await client.execute(f"print({ESCAPES!r})\nprint('end')", timeout=30)
    assert result.text is not None
    lines = result.text.splitlines()
    assert lines[-1] == "end"
    assert "before" in lines[0] and "red" in lines[0] and "after" in lines[0]
    assert result.images == []


async def test_escape_sequences_are_stripped_from_text(client: ExecutionClient) -> None:
    result = await client.execute(f"print({ESCAPES!r})", timeout=30)
    assert result.text is not None
    assert "\x1b" not in result.text and "\x07" not in result.text


async def test_allowed_hosts_option_admits_a_name(make_container) -> None:  # type: ignore[no-untyped-def]
    from ipybox import _tokens

    container = await make_container(allowed_hosts=["build-box"])
    token = _tokens.lookup("localhost", container.resource_port)
    async with aiohttp.ClientSession(headers={"Authorization": f"token {token}"}) as session:
        url = f"http://127.0.0.1:{container.resource_port}/status"
        async with session.get(url, headers={"Host": f"build-box:{container.resource_port}"}) as response:
            assert response.status == 200
        async with session.get(url, headers={"Host": "other-box"}) as response:
            assert response.status == 403
