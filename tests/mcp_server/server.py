"""An MCP server for the tests, built with the SDK's MCPServer (FastMCP in mcp 1.x).

Run it as `python server.py stdio`, `python server.py streamable-http HOST PORT` or
`python server.py sse HOST PORT`. Self-contained (only the `mcp` SDK), so its source can be uploaded
into a container and started there. Set `MCP_TEST_WITHOUT=<tool name>` to leave a tool out (to test
regeneration).
"""

from __future__ import annotations

import os
import sys

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from pydantic import BaseModel, Field

# If any of these strings escaped its literal in generated code, importing it would create PWNED_PATH.
PWNED_PATH = "/app/pwned"
HOSTILE_NAME = 'evil\'\'\'"""\\\n"); open("/app/pwned", "w") #'
HOSTILE_DESCRIPTION = 'Says \'\'\'hi\'\'\' and """bye""" \\ back\\\n"); open("/app/pwned", "w") #\n\tend"'
ERROR_MESSAGE = "the tool failed on purpose: 42"

server = MCPServer("ipybox-test")


class Address(BaseModel):
    street: str
    zip_code: int = Field(description="Postal code")


class Person(BaseModel):
    name: str
    address: Address
    tags: list[str] = []


def tool_echo(text: str) -> str:
    """Echo the text back."""
    return text


def tool_get_weather(city: str, days: int = 1) -> str:
    return f"{city}: sunny for {days} day(s)"


def tool_register(person: Person) -> str:
    """Register a person (nested schema)."""
    return f"{person.name} lives at {person.address.street} {person.address.zip_code}; tags={person.tags}"


def tool_fail(reason: str = "") -> str:
    """Always fails."""
    raise ToolError(ERROR_MESSAGE)


def tool_stats(values: list[float]) -> dict[str, float]:
    """Structured result."""
    return {"count": len(values), "total": sum(values)}


def tool_hostile(x: str = "") -> str:
    return f"hostile:{x}"


TOOLS = [
    (tool_echo, "echo", None, False),
    (tool_get_weather, "get-weather", "Weather forecast for a city.", False),
    (tool_register, "register", None, False),
    (tool_fail, "fail", None, False),
    (tool_stats, "stats", None, True),
    (tool_hostile, HOSTILE_NAME, HOSTILE_DESCRIPTION, False),
]

for fn, name, description, structured in TOOLS:
    if name != os.environ.get("MCP_TEST_WITHOUT"):
        server.add_tool(fn, name=name, description=description, structured_output=structured)


def main(argv: list[str]) -> None:
    transport = argv[1] if len(argv) > 1 else "stdio"
    if transport == "stdio":
        server.run("stdio")
        return
    host, port = argv[2], int(argv[3])
    # The container reaches this server by the bridge's gateway address, not by localhost.
    security = TransportSecuritySettings(enable_dns_rebinding_protection=False)
    if transport == "sse":
        server.run("sse", host=host, port=port, transport_security=security)
    else:
        server.run("streamable-http", host=host, port=port, transport_security=security)


if __name__ == "__main__":
    main(sys.argv)
