"""Hostile model code is refused before the MCP generator runs it (issue 13). No container.

The generator checks datamodel-code-generator's output against an allowlist (`check_model_code`), then
executes it once (`check_model_runs`). typing and pydantic evaluate strings as Python code where they
expect a type, so each case below, if it passed the check, would run its payload in the generator
process: the payload creates a file, which must never appear.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "ipybox" / "_image"))

from ipybox_server import mcp_generate  # noqa: E402

HEADER = "from __future__ import annotations\nfrom pydantic import BaseModel\n"

# name: (model code with PAYLOAD where the code to run goes, what the refusal must name)
HOSTILE = {
    "string annotation": (HEADER + "class Params(BaseModel):\n    x: PAYLOAD\n", "string annotation"),
    "string in a subscript": (HEADER + "class Params(BaseModel):\n    x: list[PAYLOAD]\n", "string annotation"),
    "string deep in a union": (
        HEADER + "class Params(BaseModel):\n    x: dict[str, list[PAYLOAD]] | None = None\n",
        "string annotation",
    ),
    "string in a class base": (
        "from pydantic import RootModel\nclass Params(RootModel[PAYLOAD]):\n    pass\n",
        "string annotation",
    ),
    "imported private name": (
        HEADER
        + "from typing import ForwardRef, _eval_type\n"
        + "class Params(BaseModel):\n    x: _eval_type(ForwardRef(PAYLOAD), None, None)\n",
        "private name '_eval_type' from 'typing'",
    ),
    "private name under a public alias": (
        HEADER
        + "from typing import ForwardRef, _eval_type as evaluate\n"
        + "class Params(BaseModel):\n    x: evaluate(ForwardRef(PAYLOAD), None, None)\n",
        "private name '_eval_type' from 'typing'",
    ),
    "module name bound to a string": (
        HEADER + "X = PAYLOAD\nclass Params(BaseModel):\n    x: X\n",
        "module-level Assign",
    ),
    "field shadowing a name of an annotation": (
        HEADER + "class Params(BaseModel):\n    str: int = PAYLOAD\n    y: str\n",
        "class attribute 'str' shadows",
    ),
    "ForwardRef called in an annotation": (
        HEADER + "from typing import ForwardRef\n" + "class Params(BaseModel):\n    x: ForwardRef(PAYLOAD)\n",
        "call of 'ForwardRef'",
    ),
    "TypeVar bound to a string": (
        HEADER + "from typing import TypeVar\n" + "class Params(BaseModel):\n    x: TypeVar('T', bound=PAYLOAD)\n",
        "call of 'TypeVar'",
    ),
    "str enum member as a type": (
        HEADER
        + "from enum import StrEnum\n"
        + "class E(StrEnum):\n    a = PAYLOAD\nclass Params(BaseModel):\n    x: E.a\n",
        "Attribute 'E.a' in an annotation",
    ),
}


def _payload(marker: Path) -> str:
    return repr(f"__import__('pathlib').Path({str(marker)!r}).touch()")


def _check_then_run(source: str) -> None:
    """What the generator does with model code: run it only if the check passes."""
    mcp_generate.check_model_code(ast.parse(source))
    mcp_generate.check_model_runs(source)


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_model_code_is_refused_and_never_runs(case: str, tmp_path: Path) -> None:
    template, refused = HOSTILE[case]
    marker = tmp_path / "ran"
    try:
        _check_then_run(template.replace("PAYLOAD", _payload(marker)))
        outcome = "passed the check and ran"
    except mcp_generate.UnsafeModelCode as exc:
        outcome = f"refused: {exc}"
    except Exception as exc:  # pydantic failing on what the payload returned
        outcome = f"passed the check and ran, then {type(exc).__name__}"
    assert not marker.exists(), f"the payload ran ({outcome})"
    assert outcome.startswith("refused: ") and refused in outcome and " at line " in outcome, outcome


def test_a_refusal_names_the_class_and_field(tmp_path: Path) -> None:
    source = HOSTILE["string deep in a union"][0].replace("PAYLOAD", _payload(tmp_path / "ran"))
    with pytest.raises(mcp_generate.UnsafeModelCode) as info:
        mcp_generate.check_model_code(ast.parse(source))
    assert str(info.value).startswith("string annotation \"__import__('pathlib')")
    assert str(info.value).endswith("at line 4 (class Params, field x)")


def test_literal_values_and_field_strings_are_still_allowed() -> None:
    source = (
        HEADER + "from typing import Literal\nfrom pydantic import Field, constr\n"
        "class Params(BaseModel):\n"
        "    '''A docstring.'''\n"
        "    mode: Literal['fast', \"__import__('os')\"] = Field('fast', description=\"__import__('os')\")\n"
        "    name: constr(pattern='^[a-z]+$') | None = None\n"
    )
    _check_then_run(source)


# customTypePath makes datamodel-code-generator import any dotted name as the field's type.
PRIVATE_TYPE_SCHEMA = {"type": "object", "properties": {"a": {"type": "string", "customTypePath": "typing._eval_type"}}}


def test_a_schema_importing_a_private_name_is_refused() -> None:
    pytest.importorskip("datamodel_code_generator")
    with pytest.raises(mcp_generate.UnsafeModelCode, match="private name '_eval_type' from 'typing'"):
        mcp_generate.model_code(PRIVATE_TYPE_SCHEMA)


def test_the_tool_module_says_which_tool_and_what_was_refused() -> None:
    pytest.importorskip("datamodel_code_generator")
    source = mcp_generate.tool_module("srv", "hostile-tool", "hostile_tool", None, PRIVATE_TYPE_SCHEMA)
    assert mcp_generate.FALLBACK_MODEL.strip() in source  # the permissive model, not the generated one
    values = {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
    }
    assert values["_MODEL_ERROR"] == (
        "the input schema of tool 'hostile-tool' gave no model: UnsafeModelCode: "
        "import of private name '_eval_type' from 'typing' at line 2"
    )
