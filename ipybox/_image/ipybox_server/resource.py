"""The resource server (container port 8900): files, module sources and MCP code generation.

Every request must come from an allowed host and origin (`origin.refusal`, checked first) and carry
the per-container secret as `Authorization: token <secret>`. That includes `GET /openapi.json`, the
description of every route (openapi.py): one rule without exceptions leaves no unauthenticated route to
get wrong, and the only readers of the description (clients, the fuzz test) hold the secret anyway.

Every error answer is JSON `{"error": "<message>"}`: the handlers raise them so, and `json_errors`
rewrites aiohttp's own plain-text ones (404 no such route, 405 wrong method, ...) and turns a handler's
unexpected exception into a 500 that names it (a bug: the fuzz test fails on any 5xx).
"""

import errno
import hmac
import logging
import time

from aiohttp import hdrs, web

from ipybox_server import files, lifecycle, mcp_sources, modules, openapi, origin, tool_hosts, tools

logger = logging.getLogger(__name__)

TOKEN_KEY = web.AppKey("token", str)
ALLOWED_HOSTS_KEY = web.AppKey("allowed_hosts", frozenset)


def _header(request: web.Request, name: str) -> str | None:
    # Repeated headers are joined, so that a second Origin cannot hide behind an allowed first one.
    values = request.headers.getall(name, [])
    return ",".join(values) if values else None


def _message(request: web.Request, exc: web.HTTPException) -> str:
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return f"method {request.method} is not allowed for {request.path} (allowed: {allowed})"
    if isinstance(exc, web.HTTPNotFound):
        return f"no route for {request.method} {request.path}"
    text = exc.text or ""
    return text.removeprefix(f"{exc.status}: ") or exc.reason


def _allow(exc: web.HTTPException) -> dict[str, str]:
    return {hdrs.ALLOW: exc.headers[hdrs.ALLOW]} if hdrs.ALLOW in exc.headers else {}


@web.middleware
async def json_errors(request: web.Request, handler):  # type: ignore[no-untyped-def]
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json" or request.writer.output_size:
            raise
        # aiohttp's own errors (router, request parsing) are text/plain "404: Not Found".
        return web.json_response({"error": _message(request, exc)}, status=exc.status, headers=_allow(exc))
    except Exception as exc:
        if isinstance(exc, ConnectionError) or request.writer.output_size:
            raise  # the client went away, or a streamed answer already began: aiohttp closes the connection
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            # Sandbox code filled /app (a size-capped tmpfs): the sandbox's state, not a server bug.
            return web.json_response(
                {
                    "error": f"no space left in the sandbox for {request.method} {request.path}: /app or /tmp is "
                    "full; delete files there, or start the container with a larger app_size"
                },
                status=507,
            )
        logger.exception("%s %s failed", request.method, request.path)
        return web.json_response(
            {"error": f"internal error in {request.method} {request.path}: {type(exc).__name__}: {exc}"}, status=500
        )


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


async def openapi_description(request: web.Request) -> web.Response:
    return web.json_response(openapi.SPEC)


def create_app(
    token: str, allowed_hosts: frozenset[str] = frozenset(), watchdog: lifecycle.Watchdog | None = None
) -> web.Application:
    # client_max_size=0: uploads stream through handlers, so no whole-body size cap applies here.
    # note_activity after require_token: only an authenticated request keeps the sandbox from idling.
    app = web.Application(
        middlewares=[json_errors, require_allowed_origin, require_token, lifecycle.note_activity], client_max_size=0
    )
    app[TOKEN_KEY] = token
    app[ALLOWED_HOSTS_KEY] = allowed_hosts
    app.router.add_get("/status", status)
    app.router.add_get(openapi.OPENAPI_PATH, openapi_description)
    files.add_routes(app)
    modules.add_routes(app)
    mcp_sources.add_routes(app)
    tools.add_routes(app)
    tool_hosts.add_routes(app)
    lifecycle.add_routes(app, watchdog if watchdog is not None else lifecycle.Watchdog(time.monotonic()))
    return app
