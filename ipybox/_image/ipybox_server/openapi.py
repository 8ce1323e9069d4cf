"""The OpenAPI 3 description of the resource server, served at `GET /openapi.json` (token required).

A plain dict, so that it needs nothing at run time and the host's unit tests can compare it with the
routes the app registers (tests/unit/test_openapi.py: neither may have a route the other lacks). The
fuzz test (tests/adversarial/test_fuzz_resource.py) loads it from a live server and runs schemathesis
against every operation it lists.

Every error is JSON `{"error": "<message>"}` (resource.py turns aiohttp's own plain-text errors, such as
404 for an unknown path or 405 for a wrong method, into that shape too).
"""

from __future__ import annotations

from typing import Any

OPENAPI_PATH = "/openapi.json"

_ERROR = {"$ref": "#/components/schemas/Error"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR}}}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _links(*operation_ids: str) -> dict[str, Any]:
    """Links from an answer to the operations on the same `relpath` (the fuzz test's stateful phase follows them)."""
    return {op: {"operationId": op, "parameters": {"relpath": "$request.path.relpath"}} for op in operation_ids}


def _responses(ok: dict[str, Any], *codes: str) -> dict[str, Any]:
    """`ok` as 200, the named error responses, and the 400/401/403/507 every route can answer."""
    responses = {"200": ok}
    for code in ("400", "401", "403", *codes, "507"):
        responses[code] = {"$ref": f"#/components/responses/{_NAMES[code]}"}
    return responses


_NAMES = {
    "400": "BadRequest",
    "401": "Unauthorized",
    "403": "Forbidden",
    "404": "NotFound",
    "409": "Conflict",
    "413": "TooLarge",
    "422": "Unprocessable",
    "507": "NoSpace",
}

_RELPATH = {
    "name": "relpath",
    "in": "path",
    "required": True,
    "description": (
        "A path relative to /app; may contain `/` between segments (each segment percent-encoded). Refused "
        "with 400: a NUL byte, an absolute path, a `..` segment (also after one more round of "
        "percent-decoding), or a path that leads outside /app through a symlink."
    ),
    "schema": {"type": "string", "minLength": 1},
    "examples": {"file": {"value": "data/input.csv"}, "top": {"value": "notes.txt"}},
}

_DIR_RELPATH = {
    **_RELPATH,
    "description": _RELPATH["description"] + " Empty (`/directories/`) means /app itself.",
    "examples": {"nested": {"value": "data"}, "project": {"value": "project/src"}},
}

_SERVER_NAME = {
    "type": "string",
    "pattern": "^[A-Za-z_][A-Za-z0-9_]*$",
    "description": "A Python identifier (not a keyword): it names the generated package.",
}

# A dotted Python name; the server accepts any `str.isidentifier()` parts, non-ASCII ones too.
_MODULE_NAME = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}, "nullable": True}

# As mcp_params.normalize accepts them (null stands for absent where it does).
_STDIO_PARAMS = {
    "type": "object",
    "required": ["command"],
    "additionalProperties": False,
    "properties": {
        "type": {"type": "string", "enum": ["stdio", None], "nullable": True},
        "command": {"type": "string", "minLength": 1, "pattern": "^[^\\x00]+$"},
        "args": {"type": "array", "items": {"type": "string"}},
        "env": _STRING_MAP,
        "cwd": {"type": "string", "nullable": True},
    },
}

_HTTP_PARAMS = {
    "type": "object",
    "required": ["url"],
    "additionalProperties": False,
    "properties": {
        "type": {"type": "string", "enum": ["streamable_http", "sse", None], "nullable": True},
        "url": {
            "type": "string",
            "pattern": "^https?://[^\\s/?#:@]",
            "description": "Without `type`, a URL containing `/mcp` means streamable HTTP and `/sse` SSE.",
        },
        "headers": _STRING_MAP,
    },
    # The transport must be told or be found in the URL.
    "anyOf": [
        {"required": ["type"], "properties": {"type": {"type": "string"}}},
        {"properties": {"url": {"pattern": "/(mcp|sse)"}}},
    ],
}

_SERVER_PARAMS = {"oneOf": [_STDIO_PARAMS, _HTTP_PARAMS]}

_TOOL = {
    "type": "object",
    "required": ["name"],
    "description": "A tool as MCP's tools/list describes it.",
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "description": {"type": "string", "nullable": True},
        "inputSchema": {"type": "object", "nullable": True},
        "outputSchema": {"type": "object", "nullable": True},
    },
}

_TOOL_SERVER_PATH_NAME = {"name": "name", "in": "path", "required": True, "schema": _SERVER_NAME}

_TOOL_SERVER = {
    "type": "object",
    "required": ["where", "pid", "calls"],
    "properties": {
        "where": {"type": "string", "enum": ["sandbox", "host"]},
        "pid": {
            "type": "integer",
            "nullable": True,
            "description": "The process of a running in-sandbox stdio server (diagnostics).",
        },
        "starts": {"type": "integer", "description": "How often the server's session was started."},
        "calls": {"type": "integer"},
        "connected": {"type": "boolean", "description": "Host-side servers: whether their host is connected."},
    },
}

SPEC: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "ipybox resource server",
        "version": "1",
        "description": (
            "Files, directories, module sources, MCP client generation and the MCP tool service of one ipybox sandbox "
            "(container port 8900, published on 127.0.0.1). Every request needs the container's secret "
            "as `Authorization: token <secret>` and an allowed Host/Origin (a DNS-rebinding guard). "
            'Errors are JSON `{"error": "<message>"}`.'
        ),
    },
    "security": [{"token": []}],
    "paths": {
        "/lease": {
            "get": {
                "operationId": "holdLease",
                "summary": "Hold the sandbox's owner lease: a websocket the owner keeps open without traffic.",
                "description": (
                    "A sandbox started with `owner_bound` ends itself when the last lease has been closed "
                    "for its grace period (the owner died). Only a websocket upgrade is accepted; a plain "
                    "GET is refused with 400."
                ),
                "responses": {
                    "101": {"description": "Switching to the websocket; the lease is held until it closes."},
                    **{
                        code: {"$ref": f"#/components/responses/{_NAMES[code]}"}
                        for code in ("400", "401", "403", "507")
                    },
                },
            }
        },
        "/lifecycle": {
            "put": {
                "operationId": "setIdleTimeout",
                "summary": "Arm, re-arm or disarm the sandbox's idle timeout, counted from now.",
                "description": (
                    "A `SandboxPool` with `idle_timeout` starts its spares without one and arms it when it hands "
                    "a sandbox out. The lifetime and the owner binding are fixed at create time. 409 for a "
                    "sandbox not created to end itself (its container would be left stopped)."
                ),
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["idle_timeout"],
                                "additionalProperties": False,
                                "properties": {
                                    "idle_timeout": {
                                        "type": "number",
                                        "nullable": True,
                                        "minimum": 0,
                                        "exclusiveMinimum": True,
                                    }
                                },
                            }
                        }
                    },
                },
                "responses": _responses(
                    _json(
                        "The limits now in force (seconds; null for none).",
                        {
                            "type": "object",
                            "properties": {
                                name: {"type": "number", "nullable": True}
                                for name in ("idle_timeout", "max_lifetime", "owner_grace")
                            },
                        },
                    ),
                    "409",
                ),
            }
        },
        "/status": {
            "get": {
                "operationId": "getStatus",
                "summary": "Whether the server is up.",
                "responses": _responses(
                    _json(
                        "The server answers.",
                        {
                            "type": "object",
                            "required": ["status"],
                            "properties": {"status": {"type": "string", "enum": ["ok"]}},
                        },
                    )
                ),
            }
        },
        OPENAPI_PATH: {
            "get": {
                "operationId": "getOpenApi",
                "summary": "This description.",
                "responses": _responses(_json("The OpenAPI description.", {"type": "object"})),
            }
        },
        "/files/{relpath}": {
            "parameters": [_RELPATH],
            "put": {
                "operationId": "putFile",
                "summary": "Write /app/<relpath> atomically, creating parent directories.",
                "requestBody": {
                    "description": "The file's bytes; an empty or missing body writes an empty file.",
                    "required": False,
                    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
                },
                "responses": _responses(
                    {
                        **_json(
                            "Written.",
                            {
                                "type": "object",
                                "required": ["size"],
                                "additionalProperties": False,
                                "properties": {"size": {"type": "integer", "minimum": 0}},
                            },
                        ),
                        "links": _links("getFile", "deleteFile", "putDirectory"),
                    },
                    "409",
                ),
            },
            "get": {
                "operationId": "getFile",
                "summary": "Read /app/<relpath>.",
                "responses": _responses(
                    {
                        "description": "The file's bytes.",
                        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
                    },
                    "404",
                ),
            },
            "delete": {
                "operationId": "deleteFile",
                "summary": "Delete the file /app/<relpath> (not a directory).",
                "responses": _responses(
                    {
                        **_json("Deleted.", {"type": "object", "additionalProperties": False, "properties": {}}),
                        "links": _links("getFile"),
                    },
                    "404",
                ),
            },
        },
        "/directories/{relpath}": {
            "parameters": [_DIR_RELPATH],
            "put": {
                "operationId": "putDirectory",
                "summary": "Extract an uncompressed tar into /app/<relpath> (staged, merged into what is there).",
                "requestBody": {
                    "required": True,
                    "content": {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}},
                },
                "responses": _responses(
                    {
                        **_json(
                            "Extracted.",
                            {
                                "type": "object",
                                "required": ["files", "size"],
                                "additionalProperties": False,
                                "properties": {
                                    "files": {"type": "integer", "minimum": 0},
                                    "size": {"type": "integer", "minimum": 0},
                                },
                            },
                        ),
                        "links": _links("getDirectory", "putFile"),
                    },
                    "409",
                    "413",
                ),
            },
            "get": {
                "operationId": "getDirectory",
                "summary": "An uncompressed tar of the directory's regular files and directories.",
                "parameters": [
                    {
                        "name": "exclude_mounts",
                        "in": "query",
                        "required": False,
                        "description": (
                            "`true`: leave out mount points below the directory (binds under /app: host "
                            "directories) with everything below them. Snapshots use it."
                        ),
                        "schema": {"type": "string", "enum": ["true", "false"], "default": "false"},
                    },
                    {
                        "name": "exclude",
                        "in": "query",
                        "required": False,
                        "style": "form",
                        "explode": True,
                        "description": (
                            "Entries (relative to the directory, `a/b`) left out with everything below them; "
                            "a name no entry has leaves nothing out."
                        ),
                        "schema": {"type": "array", "maxItems": 64, "items": {"type": "string"}},
                    },
                ],
                "responses": _responses(
                    {
                        "description": "The archive, chunked.",
                        "content": {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}},
                    },
                    "404",
                ),
            },
        },
        "/modules": {
            "get": {
                "operationId": "getModuleSources",
                "summary": "Python sources of modules on the kernel's search path, found without importing them.",
                "parameters": [
                    {
                        "name": "name",
                        "in": "query",
                        "required": True,
                        "style": "form",
                        "explode": True,
                        "description": "Dotted module names; all must be found (404 names the first that is not).",
                        "example": ["json", "os.path", "email.mime.text"],
                        "schema": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": 100,
                            "items": {"type": "string", "pattern": _MODULE_NAME},
                        },
                    }
                ],
                "responses": _responses(
                    _json(
                        "Sources keyed by module name.", {"type": "object", "additionalProperties": {"type": "string"}}
                    ),
                    "404",
                ),
            }
        },
        "/tools/servers": {
            "get": {
                "operationId": "listToolServers",
                "summary": "The MCP servers the tool service knows: in the sandbox and offered by a host.",
                "responses": _responses(
                    _json(
                        "Servers by name.",
                        {
                            "type": "object",
                            "required": ["servers"],
                            "properties": {"servers": {"type": "object", "additionalProperties": _TOOL_SERVER}},
                        },
                    )
                ),
            }
        },
        "/tools/servers/{name}": {
            "parameters": [_TOOL_SERVER_PATH_NAME],
            "put": {
                "operationId": "registerToolServer",
                "summary": "Register (or replace) an in-sandbox MCP server for the generated modules' calls.",
                "description": (
                    "The parameters stay in the server process's memory, never in a file. The session starts "
                    "on the first call; replacing a registration closes the old session."
                ),
                "requestBody": {"required": True, "content": {"application/json": {"schema": _SERVER_PARAMS}}},
                "responses": _responses(
                    _json(
                        "Registered.",
                        {
                            "type": "object",
                            "required": ["server", "where"],
                            "properties": {"server": {"type": "string"}, "where": {"type": "string"}},
                        },
                    ),
                    "409",
                ),
            },
            "delete": {
                "operationId": "unregisterToolServer",
                "summary": "Unregister an in-sandbox MCP server and close its session.",
                "responses": _responses(
                    _json(
                        "Unregistered.",
                        {"type": "object", "required": ["server"], "properties": {"server": {"type": "string"}}},
                    ),
                    "404",
                ),
            },
        },
        "/tools/host": {
            "get": {
                "operationId": "toolHostWebsocket",
                "summary": "The websocket a host opens to serve MCP servers that run on the host (ipybox.ToolHost).",
                "description": (
                    "A websocket (Upgrade: websocket); a plain GET is refused with 400. JSON text frames: "
                    'host -> server `{"type": "offer", "servers": [name, ...]}` first, answered with '
                    '`{"type": "offered", "servers": [...]}` or `{"type": "refused", "error"}` (a name registered '
                    'in the sandbox is refused); then server -> host `{"type": "call", "id", "server", "tool", '
                    '"arguments"}` and `{"type": "cancel", "id"}`, host -> server `{"type": "result", "id", '
                    '"result": {"is_error", "text", "structured"}}` or `{"type": "error", "id", "error", "kind"}`. '
                    "When the websocket closes, its names fail with kind `unavailable` until offered again."
                ),
                "responses": {
                    "101": {"description": "Switching to the websocket protocol."},
                    **_responses(_json("Not sent: the answer is 101 or an error.", {"type": "object"})),
                },
            }
        },
        "/mcp/sources": {
            "post": {
                "operationId": "generateMcpSources",
                "summary": "Connect to an MCP server from the sandbox; generate /app/<relpath>/<server_name>/.",
                "description": (
                    "With `server_params`: lists the server's tools from inside the sandbox, writes the package "
                    "and registers the server with the tool service (as `PUT /tools/servers/{name}`), so that the "
                    "generated functions work at once. The package holds no parameters (no env, no headers). "
                    "With `tools` instead (a host-side server, listed by the host): generates from that list "
                    "without connecting anywhere, and registers nothing."
                ),
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "oneOf": [
                                    {
                                        "type": "object",
                                        "required": ["relpath", "server_name", "server_params"],
                                        "properties": {
                                            "relpath": {"type": "string"},
                                            "server_name": _SERVER_NAME,
                                            "server_params": _SERVER_PARAMS,
                                        },
                                    },
                                    {
                                        "type": "object",
                                        "required": ["relpath", "server_name", "tools"],
                                        "properties": {
                                            "relpath": {"type": "string"},
                                            "server_name": _SERVER_NAME,
                                            "tools": {"type": "array", "maxItems": 10000, "items": _TOOL},
                                        },
                                    },
                                ]
                            }
                        }
                    },
                },
                "responses": _responses(
                    _json(
                        "Generated.",
                        {
                            "type": "object",
                            "required": ["modules"],
                            "properties": {"modules": {"type": "array", "items": {"type": "string"}}},
                        },
                    ),
                    "422",
                ),
            },
            "get": {
                "operationId": "getMcpSources",
                "summary": "The generated tool modules of /app/<relpath>/<server_name>/.",
                "parameters": [
                    {"name": "server_name", "in": "query", "required": True, "schema": _SERVER_NAME},
                    {"name": "relpath", "in": "query", "required": False, "schema": {"type": "string"}},
                ],
                "responses": _responses(
                    _json(
                        "Sources keyed by module name.", {"type": "object", "additionalProperties": {"type": "string"}}
                    ),
                    "404",
                ),
            },
        },
    },
    "components": {
        "securitySchemes": {
            "token": {
                "type": "apiKey",
                "in": "header",
                "name": "Authorization",
                "description": "`token <secret>`: the per-container secret the host clients find on their own.",
            }
        },
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error"],
                "additionalProperties": False,
                "properties": {"error": {"type": "string", "minLength": 1}},
            }
        },
        "responses": {
            "BadRequest": _error("The request is malformed or refused (a bad path, name, archive or parameter)."),
            "Unauthorized": _error("The token is missing or wrong."),
            "Forbidden": _error("The Host or Origin header is not allowed."),
            "NotFound": _error("Nothing of the requested kind there."),
            "Conflict": _error(
                "The write clashes with an existing entry of another type, or the MCP server name is served by "
                "a connected host."
            ),
            "TooLarge": _error("An uploaded archive is over a cap."),
            "Unprocessable": _error("The MCP server could not be reached, failed, or did not answer in time."),
            "NoSpace": _error("A write found /app or /tmp full (the sandbox's size caps); delete files there."),
        },
    },
}
