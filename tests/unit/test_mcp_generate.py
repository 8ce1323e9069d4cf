"""Name sanitizing, literals and module generation of ipybox_server.mcp_generate (no container)."""

from __future__ import annotations

import ast
import keyword
import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent.parent / "ipybox" / "_image"))

from ipybox_server import mcp_generate, mcp_params  # noqa: E402

HOSTILE = 'x\'\'\'"""\\\n"); open("/tmp/ipybox-pwned", "w") #\r\x00 end"'
# A lone surrogate cannot be UTF-8 source text; datamodel-code-generator's output with one fails to parse.
SURROGATE = HOSTILE + "\ud800"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("get-weather", "get_weather"),
        ("echo", "echo"),
        ("class", "class_"),
        ("3d.render", "tool_3d_render"),
        ("__init__", "init__"),
        ("", "tool"),
        ("---", "tool"),
        ("naïve tool", "na_ve_tool"),
        ('a"); import os #', "a____import_os__"),
    ],
)
def test_sanitize_name(name: str, expected: str) -> None:
    result = mcp_generate.sanitize_name(name)
    assert result == expected
    assert result.isidentifier() and result.isascii() and not keyword.iskeyword(result)
    assert not result.startswith("_")


def test_collisions_are_resolved_independent_of_order() -> None:
    names = ["a-b", "a_b", "a.b", "a b", "c"]
    expected = {"a_b": "a_b", "c": "c", "a b": "a_b_2", "a-b": "a_b_3", "a.b": "a_b_4"}
    assert mcp_generate.module_names(names) == expected
    assert mcp_generate.module_names(list(reversed(names))) == expected
    assert len(set(expected.values())) == len(expected)


def test_long_names_are_capped() -> None:
    names = mcp_generate.module_names(["x" * 300, "x" * 301])
    assert all(len(name) <= mcp_generate.MAX_NAME_LENGTH + 2 for name in names.values())
    assert len(set(names.values())) == 2


@pytest.mark.parametrize("text", [HOSTILE, SURROGATE, "plain", 'ends with quote"', "back\\slash\\", "", "a\n  b\n\tc"])
@pytest.mark.parametrize("indent", ["", "    "])
def test_docstring_literal_round_trips(text: str, indent: str) -> None:
    literal = mcp_generate.docstring_literal(text, indent)
    assert ast.literal_eval(literal) == text.replace("\n", "\n" + indent)


def test_literal_refuses_values_that_do_not_round_trip() -> None:
    assert ast.literal_eval(mcp_generate.literal({"a": [HOSTILE, 1, None]})) == {"a": [HOSTILE, 1, None]}
    with pytest.raises(ValueError):
        mcp_generate.literal(float("nan"))


def test_params_are_validated() -> None:
    assert mcp_params.normalize({"url": "http://h:1/mcp"})["type"] == "streamable_http"
    assert mcp_params.normalize({"url": "http://h:1/sse"})["type"] == "sse"
    assert mcp_params.normalize({"command": "x"}) == {"type": "stdio", "command": "x", "args": []}
    for bad in ({}, {"command": ""}, {"url": "ftp://h/mcp"}, {"url": "http://h/x"}, {"command": "x", "bogus": 1}):
        with pytest.raises(mcp_params.ParamsError):
            mcp_params.normalize(bad)


@pytest.mark.parametrize(
    "url", ["http://[YOUR-HOST-IP-ADDRESS]:8000/mcp", "http://host:99999/mcp", "http://host:port/mcp", "http:///mcp"]
)
def test_a_url_that_is_no_url_is_a_params_error_naming_it(url: str) -> None:
    # The seed's example 10b ships the first as a placeholder: it was an HTTP 500 (a bare ValueError).
    with pytest.raises(mcp_params.ParamsError, match="server_params 'url'") as info:
        mcp_params.normalize({"url": url})
    assert url in str(info.value)


@pytest.mark.parametrize(
    "source",
    [
        "import os\n",
        "from os import system\n",
        "from pydantic import BaseModel\nclass A(BaseModel):\n    x: int = eval('1')\n",
        "from pydantic import BaseModel\nclass A(BaseModel):\n    x: int = BaseModel.__subclasses__()\n",
        "from pydantic import BaseModel\n@print\nclass A(BaseModel):\n    pass\n",
        "from pydantic import BaseModel\nclass A(BaseModel):\n    x: int = (lambda: 1)()\n",
        "from pydantic import BaseModel\nclass A(BaseModel):\n    def f(self): pass\n",
    ],
)
def test_unsafe_model_code_is_refused(source: str) -> None:
    with pytest.raises(mcp_generate.UnsafeModelCode):
        mcp_generate.check_model_code(ast.parse(source))


def _load(source: str, name: str) -> types.ModuleType:
    """Execute a generated tool module as `pkg.<name>` with a stub package and runtime."""
    package = types.ModuleType("pkg")
    package.__path__ = []
    package.SERVER_NAME = "srv"  # type: ignore[attr-defined]
    module = types.ModuleType(f"pkg.{name}")
    module.__package__ = "pkg"
    sys.modules["pkg"], sys.modules[module.__name__] = package, module  # pydantic resolves names there
    try:
        exec(compile(source, name, "exec"), module.__dict__)
    finally:
        del sys.modules["pkg"], sys.modules[module.__name__]
    return module


def test_tool_module_from_a_nested_schema() -> None:
    pytest.importorskip("datamodel_code_generator")
    schema = {
        "type": "object",
        "title": "Ignored",
        "properties": {
            "person": {"$ref": "#/$defs/Params"},
            "mode": {"type": "string", "enum": ["fast", HOSTILE]},
            "limit": {"type": "integer", "default": 3, "description": HOSTILE},
        },
        "required": ["person"],
        "$defs": {
            "Params": {  # a nested model named like the root one, as FastMCP servers produce
                "type": "object",
                "properties": {"name": {"type": "string"}, "address": {"$ref": "#/$defs/Address"}},
                "required": ["name"],
            },
            "Address": {"type": "object", "properties": {"street": {"type": "string"}}},
        },
    }
    source = mcp_generate.tool_module("srv", "make-person", "make_person", HOSTILE, schema)
    assert "def make_person(params: Params) -> str:" in source
    module = _load(source, "make_person")
    assert module.__doc__ == HOSTILE
    assert module._TOOL_NAME == "make-person"
    params = module.Params(person={"name": "Ann", "address": {"street": "Main"}})
    assert type(params.person).__name__ == "Params_"
    assert params.model_dump(mode="json", exclude_unset=True) == {
        "person": {"name": "Ann", "address": {"street": "Main"}}
    }
    assert module.Params.model_json_schema()["properties"]["limit"]["description"] == HOSTILE


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"r": {"$ref": "/etc/passwd"}}},
        {"type": "object", "properties": {"r": {"$ref": "http://example.invalid/schema.json"}}},
    ],
)
def test_unusable_schema_gets_a_permissive_model(schema: dict[str, object]) -> None:
    source = mcp_generate.tool_module("srv", "t", "t", None, schema)
    module = _load(source, "t")
    assert module._INPUT_SCHEMA == schema
    assert module.Params(anything=1).model_dump() == {"anything": 1}
    assert module.t.__doc__ == "Call the MCP tool 't'."


def test_function_name_avoids_model_and_builtin_names() -> None:
    source = mcp_generate.render_tool_module("srv", "list", "list", None, mcp_generate.FALLBACK_MODEL)
    assert "def list_(params: Params) -> str:" in source
    source = mcp_generate.render_tool_module("srv", "Params", "Params", None, mcp_generate.FALLBACK_MODEL)
    assert "def Params_(params: Params) -> str:" in source


def test_write_package_replaces_the_old_one(tmp_path: Path) -> None:
    target = tmp_path / "pkg" / "srv"
    mcp_generate.write_package(target, {"__init__.py": "", "a.py": "A = 1\n", "b.py": ""})
    mcp_generate.write_package(target, {"__init__.py": "", "a.py": "A = 2\n"})
    assert sorted(p.name for p in target.iterdir()) == ["__init__.py", "a.py"]
    assert (target / "a.py").read_text() == "A = 2\n"
    assert [p.name for p in target.parent.iterdir()] == ["srv"]


def test_a_field_named_like_a_renamed_class_keeps_its_name() -> None:
    pytest.importorskip("datamodel_code_generator")
    schema = {"type": "object", "properties": {"Params": {"type": "string"}, "IpyboxRootParams": {"type": "integer"}}}
    module = _load(mcp_generate.tool_module("srv", "t", "t", None, schema), "t")
    assert list(module.Params.model_fields) == ["Params", "IpyboxRootParams"]
    assert module.Params(Params="a").model_dump(exclude_unset=True) == {"Params": "a"}
