"""Validates MCP server parameters and decides their transport. No third-party imports.

Accepted shapes (anything else is refused with a message naming the problem):

- stdio: `{"command": str, "args": [str, ...], "env": {str: str}, "cwd": str}`; the server is started
  inside the container. `type` may be given as `"stdio"`.
- streamable HTTP: `{"type": "streamable_http", "url": ..., "headers": {...}}`, or no `type` and a URL
  containing `/mcp`.
- SSE: `{"type": "sse", "url": ..., "headers": {...}}`, or no `type` and a URL containing `/sse`.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

STDIO = "stdio"
STREAMABLE_HTTP = "streamable_http"
SSE = "sse"

_STDIO_KEYS = {"type", "command", "args", "env", "cwd"}
_HTTP_KEYS = {"type", "url", "headers"}


class ParamsError(ValueError):
    """The server parameters are malformed."""


def _string_map(value: Any, what: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ParamsError(f"{what} must be an object of strings")
    return dict(value)


def normalize(params: Any) -> dict[str, Any]:
    """A validated copy of `params` with an explicit `type`.

    Raises:
        ParamsError: the parameters are malformed or the transport cannot be told.
    """
    if not isinstance(params, dict):
        raise ParamsError("server_params must be an object")
    kind = params.get("type")
    if kind is not None and kind not in (STDIO, STREAMABLE_HTTP, SSE):
        raise ParamsError(f"server_params type {kind!r} is unknown: use 'stdio', 'streamable_http' or 'sse'")
    if kind == STDIO or (kind is None and "command" in params):
        return _normalize_stdio(params)
    if "url" not in params:
        raise ParamsError("server_params need a 'command' (stdio) or a 'url' (streamable_http or sse)")
    return _normalize_http(params, kind)


def _normalize_stdio(params: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(params) - _STDIO_KEYS)
    if unknown:
        raise ParamsError(f"unknown stdio server_params key(s): {', '.join(unknown)}")
    command = params.get("command")
    if not isinstance(command, str) or not command or "\x00" in command:
        raise ParamsError("server_params 'command' must be a non-empty string")
    args = params.get("args", [])
    if not isinstance(args, list) or not all(isinstance(arg, str) for arg in args):
        raise ParamsError("server_params 'args' must be a list of strings")
    result: dict[str, Any] = {"type": STDIO, "command": command, "args": list(args)}
    if params.get("env") is not None:
        result["env"] = _string_map(params["env"], "server_params 'env'")
    if params.get("cwd") is not None:
        if not isinstance(params["cwd"], str):
            raise ParamsError("server_params 'cwd' must be a string")
        result["cwd"] = params["cwd"]
    return result


def _normalize_http(params: dict[str, Any], kind: str | None) -> dict[str, Any]:
    unknown = sorted(set(params) - _HTTP_KEYS)
    if unknown:
        raise ParamsError(f"unknown server_params key(s) for an HTTP server: {', '.join(unknown)}")
    url = params["url"]
    if not isinstance(url, str):
        raise ParamsError(f"server_params 'url' must be an http(s) URL, not {url!r}")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a port that is not a number in range)
    except ValueError as exc:
        # e.g. the seed's placeholder 'http://[YOUR-HOST-IP-ADDRESS]:8000/mcp': brackets hold an IPv6 address
        raise ParamsError(
            f"server_params 'url' {url!r} is not a valid URL ({exc}); put the server's host name or address in it"
        ) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ParamsError(f"server_params 'url' must be an http(s) URL, not {url!r}")
    if kind is None:
        if "/mcp" in url:
            kind = STREAMABLE_HTTP
        elif "/sse" in url:
            kind = SSE
        else:
            raise ParamsError(
                f"cannot tell the transport of {url!r}: add 'type': 'streamable_http' or 'sse' to server_params"
            )
    result: dict[str, Any] = {"type": kind, "url": url}
    if params.get("headers") is not None:
        result["headers"] = _string_map(params["headers"], "server_params 'headers'")
    return result
