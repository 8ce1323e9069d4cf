"""The resource server's OpenAPI description (`GET /openapi.json`) and its routes cannot drift apart.

Also: every error the app answers is JSON `{"error": ...}`, aiohttp's own 404/405 included, and an
unexpected exception is a JSON 500 naming it. The server package runs in the container only; it needs
nothing but aiohttp, so it is imported from the source tree here.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "ipybox" / "_image"))

from ipybox_server import openapi, resource  # noqa: E402

TOKEN = "secret"
AUTH = {"Authorization": f"token {TOKEN}"}
METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


def app_routes(app: web.Application) -> set[tuple[str, str]]:
    # aiohttp registers HEAD next to every GET on its own; the description leaves it implicit.
    return {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }


def described_routes() -> set[tuple[str, str]]:
    return {(method, path) for path, item in openapi.SPEC["paths"].items() for method in item if method in METHODS}


def test_every_route_is_described_and_every_description_is_a_route() -> None:
    registered = app_routes(resource.create_app(TOKEN))
    described = described_routes()
    assert registered - described == set(), "routes without an OpenAPI description"
    assert described - registered == set(), "described operations the server does not have"


def test_description_is_json_with_unique_operation_ids_and_resolvable_refs() -> None:
    text = json.dumps(openapi.SPEC)
    ids = [op["operationId"] for item in openapi.SPEC["paths"].values() for m, op in item.items() if m in METHODS]
    assert len(ids) == len(set(ids))
    for ref in {part.split('"')[0] for part in text.split('"$ref": "')[1:]}:
        node = openapi.SPEC
        for key in ref.removeprefix("#/").split("/"):
            node = node[key]
    for path, item in openapi.SPEC["paths"].items():
        names = {p["name"] for p in item.get("parameters", []) if p["in"] == "path"}
        assert names == {part[1:-1] for part in path.split("/") if part.startswith("{")}, path
        for method, operation in item.items():
            for response in operation.get("responses", {}).values() if method in METHODS else ():
                for link in response.get("links", {}).values():
                    assert link["operationId"] in ids, (path, method, link)


@pytest.fixture
async def http() -> AsyncIterator[TestClient[web.Request, web.Application]]:
    app = resource.create_app(TOKEN)

    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("deliberate")

    app.router.add_get("/boom", boom)
    async with TestClient(TestServer(app)) as client:
        yield client


async def test_openapi_json_is_served_behind_the_token(http: TestClient[web.Request, web.Application]) -> None:
    refused = await http.get("/openapi.json")
    assert refused.status == 401
    response = await http.get("/openapi.json", headers=AUTH)
    assert response.status == 200
    assert await response.json() == json.loads(json.dumps(openapi.SPEC))


async def test_unknown_route_and_wrong_method_are_json_errors(http: TestClient[web.Request, web.Application]) -> None:
    missing = await http.get("/nowhere", headers=AUTH)
    assert missing.status == 404
    assert await missing.json() == {"error": "no route for GET /nowhere"}
    wrong = await http.post("/status", headers=AUTH)
    assert wrong.status == 405
    assert "GET" in wrong.headers["Allow"]
    assert (await wrong.json())["error"].startswith("method POST is not allowed for /status")


async def test_an_unexpected_exception_is_a_json_500_naming_it(
    http: TestClient[web.Request, web.Application],
) -> None:
    response = await http.get("/boom", headers=AUTH)
    assert response.status == 500
    assert await response.json() == {"error": "internal error in GET /boom: RuntimeError: deliberate"}
