"""`ipybox mcp --tool-server NAME=COMMAND` and `--tool-config FILE`: parsing, and the execute tool's description."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ipybox._errors import InvalidServerParamsError
from ipybox._mcp_session import load_tool_config, package_name, parse_tool_servers
from ipybox.mcp_server import EXECUTE_DESCRIPTION, tools_description


def test_tool_server_commands_are_split_as_a_shell_would_and_get_this_environment() -> None:
    servers = parse_tool_servers(
        ["gh=npx -y '@modelcontextprotocol/server-github'", "files=python 'my server.py' --root /tmp"],
        environ={"GITHUB_TOKEN": "secret", "PATH": "/usr/bin"},
    )
    assert servers == {
        "gh": {
            "type": "stdio",
            "command": "npx",
            "args": ["-y", "@modelcontextprotocol/server-github"],
            "env": {"GITHUB_TOKEN": "secret", "PATH": "/usr/bin"},
        },
        "files": {
            "type": "stdio",
            "command": "python",
            "args": ["my server.py", "--root", "/tmp"],
            "env": {"GITHUB_TOKEN": "secret", "PATH": "/usr/bin"},
        },
    }


@pytest.mark.parametrize(
    ("specs", "match"),
    [
        (["noequals"], "NAME=COMMAND"),
        (["=python x.py"], "NAME=COMMAND"),
        (["name="], "no command"),
        (["name=python 'unclosed"], "quotation"),
        (["1st=python x.py"], "Python package name"),
        (["class=python x.py"], "Python package name"),
        (["a-b=x", "a_b=y"], "second server named 'a_b'"),
    ],
)
def test_bad_tool_servers_are_refused(specs: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_tool_servers(specs, environ={})


def test_names_become_package_names() -> None:
    assert package_name("server-github", "x") == "server_github"
    assert package_name("my.server v2", "x") == "my_server_v2"


def write(tmp_path: Path, config: Any) -> Path:
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps(config) if not isinstance(config, str) else config)
    return path


def test_a_client_config_file_gives_stdio_and_http_servers(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {
            "mcpServers": {
                "server-github": {
                    "command": "npx",
                    "args": ["-y", "@modelcontextprotocol/server-github"],
                    "env": {"GITHUB_PERSONAL_ACCESS_TOKEN": "ghp_x"},
                    "autoApprove": ["search"],  # a client's own key: ignored
                },
                "remote": {"type": "http", "url": "http://10.0.0.5:8000/api", "headers": {"Authorization": "Bearer t"}},
                "events": {"type": "sse", "url": "http://10.0.0.5:8001/events"},
                "guessed": {"url": "http://10.0.0.5:8002/mcp"},
                "off": {"command": "nothing", "disabled": True},
            }
        },
    )
    assert load_tool_config(path) == {
        "server_github": {
            "type": "stdio",
            "command": "npx",
            "args": ["-y", "@modelcontextprotocol/server-github"],
            "env": {"GITHUB_PERSONAL_ACCESS_TOKEN": "ghp_x"},
        },
        "remote": {
            "type": "streamable_http",
            "url": "http://10.0.0.5:8000/api",
            "headers": {"Authorization": "Bearer t"},
        },
        "events": {"type": "sse", "url": "http://10.0.0.5:8001/events"},
        "guessed": {"type": "streamable_http", "url": "http://10.0.0.5:8002/mcp"},
    }


@pytest.mark.parametrize(
    ("config", "error", "match"),
    [
        ("{not json", ValueError, "not JSON"),
        ({"servers": {}}, ValueError, "mcpServers"),
        ({"mcpServers": {"a": "npx"}}, ValueError, "command or a url"),
        ({"mcpServers": {"a": {"type": "websocket", "url": "ws://x/mcp"}}}, ValueError, "unknown type"),
        ({"mcpServers": {"a": {"args": ["x"]}}}, InvalidServerParamsError, "'command'"),
        (
            {"mcpServers": {"github": {"url": "http://[YOUR-HOST-IP-ADDRESS]:8000/mcp"}}},
            InvalidServerParamsError,
            r"server 'github'.*http://\[YOUR-HOST-IP-ADDRESS\]:8000/mcp.*host name or address",
        ),
        ({"mcpServers": {"a": {"command": "x", "env": {"N": 1}}}}, InvalidServerParamsError, "env"),
    ],
)
def test_bad_config_files_are_refused_naming_the_server(
    tmp_path: Path, config: Any, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        load_tool_config(write(tmp_path, config))


def test_variables_in_the_config_are_expanded_from_the_environment(tmp_path: Path) -> None:
    # Before: "${GITHUB_TOKEN}" reached the server literally (a 401 from GitHub at the first call).
    path = write(
        tmp_path,
        {
            "mcpServers": {
                "github": {
                    "command": "${NPX:-npx}",
                    "args": ["-y", "${PKG}"],
                    "env": {"GITHUB_PERSONAL_ACCESS_TOKEN": "${GITHUB_TOKEN}", "PLAIN": "$HOME and ${"},
                },
                "remote": {"url": "http://${MCP_HOST}:8000/mcp", "headers": {"Authorization": "Bearer ${TOKEN:-}"}},
            }
        },
    )
    environ = {"PKG": "@modelcontextprotocol/server-github", "GITHUB_TOKEN": "ghp_y", "MCP_HOST": "10.0.0.7"}
    servers = load_tool_config(path, environ)
    assert servers["github"]["command"] == "npx"
    assert servers["github"]["args"] == ["-y", "@modelcontextprotocol/server-github"]
    assert servers["github"]["env"] == {"GITHUB_PERSONAL_ACCESS_TOKEN": "ghp_y", "PLAIN": "$HOME and ${"}
    assert servers["remote"]["url"] == "http://10.0.0.7:8000/mcp"
    assert servers["remote"]["headers"] == {"Authorization": "Bearer "}
    with pytest.raises(ValueError, match=r"server 'github': \$\{GITHUB_TOKEN\} is not set.*\$\{GITHUB_TOKEN:-value\}"):
        load_tool_config(path, {"PKG": "x", "MCP_HOST": "h"})


def test_the_execute_description_names_the_host_side_servers() -> None:
    assert tools_description([]) == ""
    text = tools_description(["github", "files"])
    assert "mcptools.{github, files}" in text
    assert "from mcptools.github.<tool> import Params, <tool>" in text
    assert (EXECUTE_DESCRIPTION + text).endswith("\n")
