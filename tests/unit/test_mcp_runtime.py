"""The kernel side of generated MCP tools (mcp_runtime), the call helper (mcp_call) and return-value generation."""

from __future__ import annotations

import ast
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

IMAGE_DIR = Path(__file__).parent.parent.parent / "ipybox" / "_image"
sys.path.insert(0, str(IMAGE_DIR))

from ipybox_server import mcp_call, mcp_generate, mcp_runtime  # noqa: E402
from ipybox_server.mcp_runtime import ToolCallError, ToolError, tool_value  # noqa: E402

SERVER = Path(__file__).parent.parent / "mcp_server" / "server.py"


def ok(text: str = "", structured: Any = None, is_error: bool = False) -> dict[str, Any]:
    return {"result": {"is_error": is_error, "text": text, "structured": structured}}


class Forecast(BaseModel):
    city: str


def test_text_without_output() -> None:
    assert tool_value(ok("echo: hi", {"result": "echo: hi"})) == "echo: hi"
    assert tool_value(ok("a\nb")) == "a\nb"


def test_structured_content_as_data_or_model() -> None:
    assert tool_value(ok("{}", {"city": "Vienna"}), dict) == {"city": "Vienna"}
    value = tool_value(ok("{}", {"city": "Vienna"}), Forecast)
    assert isinstance(value, Forecast) and value.city == "Vienna"
    assert tool_value(ok("only text"), Forecast) == "only text"  # no structured content: the text


def test_pydantic_1_models_are_validated_with_parse_obj() -> None:
    class V1Model:
        @classmethod
        def parse_obj(cls, data: Any) -> tuple[str, Any]:
            return ("parsed", data)

    assert tool_value(ok("", {"a": 1}), V1Model) == ("parsed", {"a": 1})


def test_errors() -> None:
    with pytest.raises(ToolError, match="^failed on purpose$"):
        tool_value(ok("failed on purpose", {"ignored": 1}, is_error=True), Forecast)
    with pytest.raises(ToolError, match="without a message"):
        tool_value(ok("", is_error=True))
    with pytest.raises(ToolError, match="^Unknown tool: x$"):
        tool_value({"error": "Unknown tool: x", "kind": "tool"})
    with pytest.raises(ToolCallError, match="FileNotFoundError"):
        tool_value({"error": "FileNotFoundError: no-such-command", "kind": "call"})
    assert not issubclass(ToolCallError, ToolError)


def test_arguments_only_set_fields_by_alias() -> None:
    from pydantic import Field

    class Params(BaseModel):
        city: str = Field(alias="City")
        days: int = 1

    assert mcp_runtime.arguments_of(Params(City="Vienna")) == {"City": "Vienna"}

    class V1Params:  # pydantic 1 has no model_dump
        def json(self, by_alias: bool, exclude_unset: bool) -> str:
            assert by_alias and exclude_unset
            return '{"when": "2026-12-07"}'

    assert mcp_runtime.arguments_of(V1Params()) == {"when": "2026-12-07"}


def test_the_kernel_side_imports_no_third_party_module() -> None:
    tree = ast.parse((IMAGE_DIR / "ipybox_server" / "mcp_runtime.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}


def test_helper_answers_for_a_real_stdio_server() -> None:
    params = {"command": sys.executable, "args": [str(SERVER)]}
    answer = mcp_call.answer({"server_params": params, "tool_name": "echo", "arguments": {"text": "hi"}})
    assert answer == ok("hi")  # echo declares no output schema
    answer = mcp_call.answer({"server_params": params, "tool_name": "stats", "arguments": {"values": [1, 2]}})
    assert answer["result"]["structured"] == {"count": 2, "total": 3.0}
    answer = mcp_call.answer({"server_params": params, "tool_name": "fail", "arguments": {}})
    assert answer["result"]["is_error"] and "the tool failed on purpose" in answer["result"]["text"]
    answer = mcp_call.answer({"server_params": params, "tool_name": "no-such-tool", "arguments": {}})
    assert answer.get("kind") == "tool" or answer["result"]["is_error"]  # an MCP error or an error result
    answer = mcp_call.answer({"server_params": {"command": "no-such-mcp-command"}, "tool_name": "x"})
    assert answer["kind"] == "call" and "no-such-mcp-command" in answer["error"]
    assert mcp_call.answer(None)["kind"] == "call"


def test_stdio_servers_get_the_certificate_settings() -> None:
    environ = {"SSL_CERT_FILE": "/etc/ca.pem", "LANG": "C.UTF-8", "SECRET": "x"}
    env = mcp_call.stdio_env({"env": {"LANG": "de_AT.UTF-8"}}, environ)
    assert env == {"SSL_CERT_FILE": "/etc/ca.pem", "LANG": "de_AT.UTF-8"}


# -- generated return values ----------------------------------------------------------------------

WRAPPED_STR = {
    "type": "object",
    "properties": {"result": {"title": "Result", "type": "string"}},
    "required": ["result"],
    "title": "echoOutput",
}
INPUT = {"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]}


def _load(source: str, answer: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    package = types.ModuleType("_ipybox_gen")
    package.__path__ = []
    package.SERVER_PARAMS = {"command": "x"}  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "_ipybox_gen", package)
    monkeypatch.setattr(mcp_runtime, "request", lambda *args: answer)
    module = types.ModuleType("_ipybox_gen.tool")
    module.__package__ = "_ipybox_gen"
    monkeypatch.setitem(sys.modules, "_ipybox_gen.tool", module)  # pydantic resolves annotations there
    exec(compile(source, "tool.py", "exec"), module.__dict__)
    return module


def test_wrapped_values_are_unwrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    assert mcp_generate.is_wrapped(WRAPPED_STR)
    source = mcp_generate.tool_module("srv", "echo", "echo", None, INPUT, WRAPPED_STR)
    assert "def echo(params: Params) -> str:" in source
    module = _load(source, ok("echo: hi", {"result": "echo: hi"}), monkeypatch)
    assert module.echo(module.Params(s="hi")) == "echo: hi"


def test_object_output_is_a_result_model_and_names_do_not_collide(monkeypatch: pytest.MonkeyPatch) -> None:
    address = {"type": "object", "properties": {"street": {"type": "string"}}, "required": ["street"]}
    input_schema = {"type": "object", "properties": {"a": {"$ref": "#/$defs/Address"}}, "$defs": {"Address": address}}
    output_schema = {
        "type": "object",
        "properties": {"home": {"$ref": "#/$defs/Address"}, "n": {"type": "integer"}},
        "required": ["home", "n"],
        "$defs": {"Address": {"type": "object", "properties": {"zip": {"type": "integer"}}, "required": ["zip"]}},
    }
    source = mcp_generate.tool_module("srv", "t", "t", None, input_schema, output_schema)
    assert "def t(params: Params) -> Result:" in source
    assert "class Address_(BaseModel):" in source
    module = _load(source, ok("{}", {"home": {"zip": 1010}, "n": 2}), monkeypatch)
    value = module.t(module.Params(a={"street": "Main"}))
    assert type(value).__name__ == "Result" and value.home.zip == 1010 and value.n == 2


def test_root_model_output_is_unwrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    output_schema = {"type": "object", "additionalProperties": {"type": "number"}}
    source = mcp_generate.tool_module("srv", "stats", "stats", None, INPUT, output_schema)
    assert "def stats(params: Params) -> dict[str, float]:" in source
    module = _load(source, ok("{}", {"count": 2, "total": 4.0}), monkeypatch)
    assert module.stats(module.Params(s="x")) == {"count": 2, "total": 4.0}


def test_an_input_model_named_result_keeps_its_name() -> None:
    input_schema = {"type": "object", "properties": {"r": {"$ref": "#/$defs/Result"}},
                    "$defs": {"Result": {"type": "object", "properties": {"x": {"type": "string"}}}}}  # fmt: skip
    source = mcp_generate.tool_module("srv", "t", "t", None, input_schema, WRAPPED_STR)
    assert "class Result(BaseModel):" in source and "class Result_(BaseModel):" in source
    assert "_call_tool(_SERVER_PARAMS, _TOOL_NAME, params, Result_).result" in source


def test_an_unusable_output_schema_gives_json_data(monkeypatch: pytest.MonkeyPatch) -> None:
    output_schema = {"type": "object", "properties": {"x": {"$ref": "https://example.invalid/x.json"}}}
    source = mcp_generate.tool_module("srv", "t", "t", None, INPUT, output_schema)
    assert "def t(params: Params) -> dict:" in source and "_OUTPUT_MODEL_ERROR = " in source
    module = _load(source, ok("{}", {"x": 1}), monkeypatch)
    assert module.t(module.Params(s="x")) == {"x": 1}
    wrapped = {**WRAPPED_STR, "properties": {"result": {"$ref": "https://example.invalid/x.json"}}}
    source = mcp_generate.tool_module("srv", "t", "t", None, INPUT, wrapped)
    module = _load(source, ok("x", {"result": [1]}), monkeypatch)
    assert module.t(module.Params(s="x")) == [1]


def test_the_package_exports_the_errors() -> None:
    files = mcp_generate.render_package("srv", {"command": "x"}, [{"name": "echo", "input_schema": INPUT}])
    assert "from ipybox_server.mcp_runtime import ToolCallError, ToolError" in files["__init__.py"]
    files = mcp_generate.render_package("srv", {"command": "x"}, [{"name": "ToolError", "input_schema": INPUT}])
    assert "import ToolCallError\n" in files["__init__.py"]
