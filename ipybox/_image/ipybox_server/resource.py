"""The resource server (container port 8900): files, module sources and MCP code generation.

Every request must come from an allowed host and origin (`origin.refusal`, checked first) and carry
the per-container secret as `Authorization: token <secret>`.
"""

import hmac

from aiohttp import hdrs, web

from ipybox_server import files, mcp_sources, modules, origin

TOKEN_KEY = web.AppKey("token", str)
ALLOWED_HOSTS_KEY = web.AppKey("allowed_hosts", frozenset)


def _header(request: web.Request, name: str) -> str | None:
    # Repeated headers are joined, so that a second Origin cannot hide behind an allowed first one.
    values = request.headers.getall(name, [])
    return ",".join(values) if values else None


@web.middleware
async def require_allowed_origin(request: web.Request, handler):  # type: ignore[no-untyped-def]
    reason = origin.refusal(_header(request, hdrs.HOST), _header(request, hdrs.ORIGIN), request.app[ALLOWED_HOSTS_KEY])
    if reason is not None:
        return web.json_response({"error": reason}, status=403)
    return await handler(request)


@web.middleware
async def require_token(request: web.Request, handler):  # type: ignore[no-untyped-def]
    expected = request.app[TOKEN_KEY]
    header = request.headers.get("Authorization", "")
    scheme, _, supplied = header.partition(" ")
    # compare_digest: the comparison time must not reveal how much of a guessed secret is right.
    if scheme.lower() != "token" or not hmac.compare_digest(supplied.encode(), expected.encode()):
        return web.json_response({"error": "missing or invalid token"}, status=401)
    return await handler(request)


async def status(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_app(token: str, allowed_hosts: frozenset[str] = frozenset()) -> web.Application:
    # client_max_size=0: uploads stream through handlers, so no whole-body size cap applies here.
    app = web.Application(middlewares=[require_allowed_origin, require_token], client_max_size=0)
    app[TOKEN_KEY] = token
    app[ALLOWED_HOSTS_KEY] = allowed_hosts
    app.router.add_get("/status", status)
    files.add_routes(app)
    modules.add_routes(app)
    mcp_sources.add_routes(app)
    return app
