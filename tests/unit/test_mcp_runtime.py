"""The kernel side of generated MCP tools (mcp_runtime), MCP connections (mcp_call) and return-value generation.

The tool service with real sockets and a real stdio server: test_tool_service.py."""

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

from ipybox_server import mcp_call, mcp_generate, mcp_runtime, tools  # noqa: E402
from ipybox_server.mcp_runtime import ToolCallError, ToolError, ToolServerError, tool_value  # noqa: E402

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
    with pytest.raises(ToolError, match="^srv.x: Unknown tool: x$"):
        tool_value({"error": "Unknown tool: x", "kind": "tool"}, None, "srv", "x")
    with pytest.raises(ToolServerError, match="FileNotFoundError"):
        tool_value({"error": "FileNotFoundError: no-such-command", "kind": "some future kind"})
    assert not issubclass(ToolCallError, ToolError)


@pytest.mark.parametrize(
    ("kind", "error_class"),
    [
        ("tool", mcp_runtime.ToolError),
        ("denied", mcp_runtime.ToolDenied),
        ("expired", mcp_runtime.ToolApprovalExpired),
        ("crash", mcp_runtime.ToolServerCrashed),
        ("unavailable", mcp_runtime.ToolServerError),
        ("unknown_server", mcp_runtime.ToolServerError),
        ("timeout", mcp_runtime.ToolTimeout),
    ],
)
def test_each_error_kind_is_its_exception_naming_server_and_tool(kind: str, error_class: type[Exception]) -> None:
    with pytest.raises(error_class) as info:
        tool_value({"error": "why", "kind": kind, "server": "srv", "tool": "t"}, None, "srv", "t")
    assert type(info.value) is error_class
    assert str(info.value) == "srv.t: why" and info.value.server == "srv" and info.value.tool == "t"
    assert isinstance(info.value, ToolCallError) and isinstance(info.value, RuntimeError)


def test_the_exception_tree() -> None:
    assert issubclass(mcp_runtime.ToolApprovalExpired, mcp_runtime.ToolDenied)
    assert issubclass(mcp_runtime.ToolServerCrashed, mcp_runtime.ToolServerError)
    assert issubclass(mcp_runtime.ToolTimeout, TimeoutError) and issubclass(mcp_runtime.ToolTimeout, ToolCallError)
    assert issubclass(mcp_runtime.ShellEscapeDenied, PermissionError)
    assert mcp_runtime.ToolDenied("not today", "s", "t").reason == "not today"
    assert set(mcp_runtime._ERRORS) == set(tools.CallFailed.KINDS)


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
    assert {name.partition(".")[0] for name in imported} <= set(sys.stdlib_module_names) | {"__future__"}


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
    package.SERVER_NAME = "srv"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "_ipybox_gen", package)
    monkeypatch.setattr(mcp_runtime, "post", lambda *args: answer)
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
    assert "_call_tool(_SERVER_NAME, _TOOL_NAME, params, Result_).result" in source


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
    files = mcp_generate.render_package("srv", [{"name": "echo", "input_schema": INPUT}])
    exported = (
        "ToolApprovalExpired, ToolCallError, ToolDenied, ToolError, ToolServerCrashed, ToolServerError, ToolTimeout"
    )
    assert f"from ipybox_server.mcp_runtime import {exported}\n" in files["__init__.py"]
    files = mcp_generate.render_package("srv", [{"name": "ToolError", "input_schema": INPUT}])
    assert f"import {exported.replace('ToolError, ', '')}\n" in files["__init__.py"]


def test_the_package_names_the_server_and_holds_no_params() -> None:
    files = mcp_generate.render_package("srv", [{"name": "echo", "input_schema": INPUT}])
    assert "SERVER_NAME = 'srv'\n" in files["__init__.py"] and "PARAMS" not in files["__init__.py"]
    assert "_call_tool(_SERVER_NAME, _TOOL_NAME, params)" in files["echo.py"]
    assert "from . import SERVER_NAME as _SERVER_NAME" in files["echo.py"]
