"""Generates a Python package for the tools of an MCP server. Runs in a subprocess of the server.

`python -I -m ipybox_server.mcp_generate` reads one JSON request from stdin
(`{"target": "/app/<relpath>/<server_name>", "server_params": {...}}`), lists the server's tools,
writes the package and prints one JSON answer: `{"modules": [...]}` or `{"error": ..., "status": ...}`.
With `"tools": [...]` (dicts with name, description, input_schema, output_schema) instead of
`server_params`, it generates from that list and connects to nothing (a server the host runs).

The package holds no server parameters (no command line, env or headers: credentials would be
readable by every cell): `__init__.py` names the server (`SERVER_NAME`), and the tool functions call it
by that name through the tool service (`mcp_runtime.call_tool`, `tools`).
A subprocess keeps the `mcp` SDK and datamodel-code-generator out of the resource server's process
(its start-up time, memory and event loop) and lets the server kill a hung generation outright.

Nothing a server sends is pasted into code as text. Strings reach the generated source as literals
that are checked to evaluate back to the same string (`repr()` or a verified docstring literal). The
pydantic model code from datamodel-code-generator is parsed, checked against an allowlist of
constructs (imports from a few modules, class definitions, annotated fields, calls to imported
names), executed once in isolation to check that it defines `Params`, and emitted again with
`ast.unparse`; a schema that fails any step gets a permissive `Params` model instead.
"""

from __future__ import annotations

import ast
import asyncio
import builtins
import errno
import json
import keyword
import os
import re
import shutil
import sys
import tempfile
import types
from pathlib import Path
from typing import Any, NoReturn

from ipybox_server import mcp_params
from ipybox_server.token import protect_process

MAX_NAME_LENGTH = 100
LIST_TIMEOUT = 120.0
MAX_PAGES = 100

_ROOT_CLASS = "IpyboxRootParams"
_MODEL_MODULES = {"__future__", "pydantic", "typing", "typing_extensions", "enum", "datetime", "decimal", "uuid"}
_MODEL_MODULES |= {"ipaddress", "pathlib", "annotated_types"}
_SAFE_BUILTINS = {"str", "int", "float", "bool", "bytes", "dict", "list", "set", "tuple", "frozenset", "object"}
_MODEL_NODES = (
    ast.Module, ast.ImportFrom, ast.alias, ast.ClassDef, ast.AnnAssign, ast.Assign, ast.Expr, ast.Constant,
    ast.Name, ast.Load, ast.Store, ast.Attribute, ast.Subscript, ast.Tuple, ast.List, ast.Dict, ast.Set,
    ast.Call, ast.keyword, ast.BinOp, ast.BitOr, ast.UnaryOp, ast.USub, ast.Pass,
)  # fmt: skip
_MODULE_NAMES = {"_call_tool", "_SERVER_NAME", "_TOOL_NAME"}

FALLBACK_MODEL = '''from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Params(BaseModel):
    """Arguments of the tool as keyword arguments; see _INPUT_SCHEMA for what the tool accepts."""

    model_config = ConfigDict(extra="allow")
'''


class GenerationError(Exception):
    """Generation failed; `status` is the HTTP status the server answers with."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


# -- names ------------------------------------------------------------------------------------------


def sanitize_name(name: str) -> str:
    """A valid, public, non-keyword ASCII identifier for tool `name` (e.g. `get-weather` -> `get_weather`)."""
    result = re.sub(r"[^0-9A-Za-z_]", "_", name)[:MAX_NAME_LENGTH].lstrip("_")
    if not result:
        result = "tool"
    if result[0].isdigit():
        result = f"tool_{result}"
    if keyword.iskeyword(result):
        result = f"{result}_"
    return result


def module_names(tool_names: list[str]) -> dict[str, str]:
    """Module name for each tool name; collisions resolved deterministically.

    Names that are already valid get themselves; the others get their sanitized form, or, when that
    is taken, the form with the lowest free suffix `_2`, `_3`, ... in sorted order of the tool names.
    The result does not depend on the order in which the server lists its tools.
    """
    unique = sorted(set(tool_names))
    taken: set[str] = set()
    result: dict[str, str] = {}
    for name in unique:
        if sanitize_name(name) == name:
            result[name] = name
            taken.add(name)
    for name in unique:
        if name in result:
            continue
        base = candidate = sanitize_name(name)
        suffix = 2
        while candidate in taken:
            candidate = f"{base}_{suffix}"
            suffix += 1
        result[name] = candidate
        taken.add(candidate)
    return result


# -- literals ---------------------------------------------------------------------------------------


def literal(value: Any) -> str:
    """`repr(value)` for JSON-like data, checked to evaluate back to an equal value."""
    text = repr(value)
    try:
        same = ast.literal_eval(text) == value
    except (ValueError, SyntaxError, RecursionError) as exc:
        raise ValueError(f"{type(value).__name__} value cannot be written as a Python literal") from exc
    if not same:
        raise ValueError(f"{type(value).__name__} value does not survive a round trip as a Python literal")
    return text


def _escape_char(char: str) -> str:
    code = ord(char)
    if char in "\n\t":
        return char
    if code < 0x20 or code == 0x7F:
        return f"\\x{code:02x}"
    if 0xD800 <= code <= 0xDFFF:
        return f"\\u{code:04x}"
    return char


def docstring_literal(text: str, indent: str = "") -> str:
    """A readable triple-quoted literal evaluating to `text` (lines after the first get `indent`).

    Falls back to `repr()` when the readable form would not evaluate back to the same string.
    """
    body = "".join(_escape_char(char) for char in text.replace("\\", "\\\\"))
    body = body.replace('"""', '\\"\\"\\"')
    if body.endswith('"'):
        body = body[:-1] + '\\"'
    expected = text.replace("\n", "\n" + indent) if indent else text
    body = body.replace("\n", "\n" + indent) if indent else body
    candidate = f'"""{body}"""'
    try:
        if ast.literal_eval(candidate) == expected:
            return candidate
    except (ValueError, SyntaxError):
        pass
    return repr(text)


# -- the pydantic model ---------------------------------------------------------------------------


class UnsafeModelCode(ValueError):
    """Model code contains a construct outside the allowlist."""


# What the positional arguments of each callable the generator emits are ("type": the first is a
# type, as in `conlist(str)`; the rest, and every keyword argument, are values).
_CALLABLES = {("pydantic", name): "value" for name in ("Field", "ConfigDict", "StringConstraints")}
_CALLABLES |= {("pydantic", f"con{kind}"): "value" for kind in ("str", "int", "float", "decimal", "bytes", "date")}
_CALLABLES |= {("pydantic", f"con{kind}"): "type" for kind in ("list", "set", "frozenset")}
_LITERAL = {("typing", "Literal"), ("typing_extensions", "Literal")}
_ANNOTATED = {("typing", "Annotated"), ("typing_extensions", "Annotated")}


def _shown(node: ast.AST, limit: int = 80) -> str:
    text = ast.unparse(node)
    return text if len(text) <= limit else text[:limit] + "..."


class _ModelChecker:
    """The allowlist of `check_model_code`: a grammar of the statements, types and values it allows.

    typing and pydantic evaluate a string as Python code wherever they expect a type (a forward
    reference): an annotation that is a string or contains one (`list["..."]`), a name in an
    annotation that holds a string when it is evaluated (a class attribute of the same name, a
    module-level assignment), a string given to a callable that takes a type (`ForwardRef`,
    `TypeAdapter`, `TypeVar(bound=...)`). So a string may appear in a type only as an argument of
    `Literal`; names in annotations may not be rebound; the only callables are the generator's
    constraint and field constructors; and every module-level name is bound once.
    """

    def __init__(self) -> None:
        self.origins: dict[str, tuple[str, str]] = {}  # imported name -> (module, name)
        self.classes: set[str] = set()
        self.where = ""

    def refuse(self, what: str, node: ast.AST) -> NoReturn:
        raise UnsafeModelCode(f"{what} at line {getattr(node, 'lineno', '?')}{self.where}")

    def module(self, tree: ast.Module) -> None:
        for node in ast.walk(tree):
            if not isinstance(node, _MODEL_NODES):
                self.refuse(type(node).__name__, node)
        bound: set[str] = set()
        for node in tree.body:
            names: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level or node.module not in _MODEL_MODULES:
                    self.refuse(f"import from {node.module!r}", node)
                for alias in node.names:
                    name = alias.asname or alias.name
                    if alias.name.startswith("_") or name.startswith("_") or alias.name == "*":
                        self.refuse(f"import of private name {alias.name!r} from {node.module!r}", node)
                    self.origins[name] = (node.module, alias.name)
                    names.append(name)
            elif isinstance(node, ast.ClassDef):
                self.classes.add(node.name)
                names.append(node.name)
            elif not isinstance(node, ast.Expr):
                self.refuse(f"module-level {type(node).__name__} {_shown(node)!r}", node)
            for name in names:
                if name in bound or name in _SAFE_BUILTINS:
                    self.refuse(f"name {name!r} bound twice (builtins included)", node)
                bound.add(name)
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                self.class_def(node)
            elif isinstance(node, ast.Expr):
                self.module_expression(node)

    def module_expression(self, node: ast.Expr) -> None:
        """A docstring or `<Model>.model_rebuild()` (without arguments: they would be namespaces)."""
        call = node.value
        if isinstance(call, ast.Constant) and isinstance(call.value, str):
            return
        if not (
            isinstance(call, ast.Call)
            and isinstance(call.func, ast.Attribute)
            and isinstance(call.func.value, ast.Name)
            and call.func.value.id in self.classes
            and call.func.attr == "model_rebuild"
            and not call.args
            and not call.keywords
        ):
            self.refuse(f"module-level expression {_shown(node)!r}", node)

    def class_def(self, node: ast.ClassDef) -> None:
        self.where = f" (class {node.name})"
        if node.decorator_list or node.keywords:
            self.refuse("decorator or class keyword", node)
        for base in node.bases:
            self.type_expr(base, set())
        bound: set[str] = set()
        used: set[str] = set()  # names in the annotations, which are evaluated in the class's namespace
        for statement in node.body:
            if isinstance(statement, ast.Pass):
                continue
            if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
                if isinstance(statement.value.value, str):
                    continue  # a docstring
            if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
                target, value = statement.targets[0], statement.value
            elif isinstance(statement, ast.AnnAssign):
                target, value = statement.target, statement.value
            else:
                self.refuse(f"{type(statement).__name__} in a class body", statement)
            if not isinstance(target, ast.Name) or target.id.startswith("__"):
                self.refuse(f"assignment to {_shown(target)!r}", statement)
            self.where = f" (class {node.name}, field {target.id})"
            if isinstance(statement, ast.AnnAssign):
                self.type_expr(statement.annotation, used)
            if value is not None:
                self.value(value)
            bound.add(target.id)
        self.where = f" (class {node.name})"
        for name in sorted(bound & used):
            self.refuse(f"class attribute {name!r} shadows the name {name!r} used in an annotation", node)
        self.where = ""

    def name(self, node: ast.Name, *, imported: bool) -> None:
        """A class of the module, a safe builtin, or (in types only) an imported name."""
        if node.id not in self.classes and node.id not in _SAFE_BUILTINS:
            if not imported or node.id not in self.origins:
                self.refuse(f"name {node.id!r}", node)

    def type_expr(self, node: ast.expr, used: set[str]) -> None:
        """An annotation, a class base or a type argument; `used` collects the names in it."""
        if isinstance(node, ast.Constant):
            if isinstance(node.value, str):
                self.refuse(f"string annotation {node.value[:80]!r}", node)
            if node.value is not None and node.value is not Ellipsis:
                self.refuse(f"constant {_shown(node)!r} in an annotation", node)
        elif isinstance(node, ast.Name):
            self.name(node, imported=True)
            used.add(node.id)
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            self.type_expr(node.left, used)
            self.type_expr(node.right, used)
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
            self.type_expr(node.value, used)
            origin = self.origins.get(node.value.id)
            args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            if origin in _LITERAL:
                for arg in args:
                    self.literal_arg(arg, used)
            elif origin in _ANNOTATED:
                self.type_expr(args[0], used)
                for metadata in args[1:]:
                    if isinstance(metadata, ast.Constant) and isinstance(metadata.value, str):
                        self.refuse(f"string {metadata.value[:80]!r} in Annotated metadata", metadata)
                    self.value(metadata)
            else:
                for arg in args:
                    for item in arg.elts if isinstance(arg, ast.List) else [arg]:  # Callable[[...], ...]
                        self.type_expr(item, used)
        elif isinstance(node, ast.Call):
            self.call(node, used)
        else:
            self.refuse(f"{type(node).__name__} {_shown(node)!r} in an annotation", node)

    def literal_arg(self, node: ast.expr, used: set[str]) -> None:
        """A value of `Literal[...]`, which typing and pydantic never evaluate: constants, enum members."""
        if isinstance(node, ast.Constant):
            return
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
            return
        if isinstance(node, ast.Attribute):
            self.value(node)
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
            if self.origins.get(node.value.id) not in _LITERAL:
                self.refuse(f"{_shown(node)!r} in Literal", node)
            self.type_expr(node, used)
        else:
            self.refuse(f"{type(node).__name__} {_shown(node)!r} in Literal", node)

    def value(self, node: ast.expr) -> None:
        """A default, an enum member's value or an argument: data, the module's classes, and the
        generator's constructors."""
        if isinstance(node, ast.Constant):
            return
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
            return
        if isinstance(node, ast.Name):
            self.name(node, imported=False)
        elif isinstance(node, ast.Attribute):  # an enum member
            if not isinstance(node.value, ast.Name) or node.value.id not in self.classes or node.attr.startswith("_"):
                self.refuse(f"attribute {_shown(node)!r}", node)
        elif isinstance(node, ast.List | ast.Tuple | ast.Set):
            for item in node.elts:
                self.value(item)
        elif isinstance(node, ast.Dict):
            for key, item in zip(node.keys, node.values, strict=True):
                if key is None:
                    self.refuse(f"dict unpacking {_shown(node)!r}", node)
                self.value(key)
                self.value(item)
        elif isinstance(node, ast.Call):
            self.call(node, set())
        else:
            self.refuse(f"{type(node).__name__} {_shown(node)!r}", node)

    def call(self, node: ast.Call, used: set[str]) -> None:
        origin = self.origins.get(node.func.id) if isinstance(node.func, ast.Name) else None
        kind = _CALLABLES.get(origin) if origin is not None else None
        if kind is None:
            self.refuse(f"call of {_shown(node.func)!r}", node)
        for index, arg in enumerate(node.args):
            if kind == "type" and index == 0:
                self.type_expr(arg, used)
            else:
                self.value(arg)
        for argument in node.keywords:
            if argument.arg is None:
                self.refuse(f"keyword unpacking in {_shown(node)!r}", node)
            self.value(argument.value)


def check_model_code(tree: ast.Module) -> None:
    """Refuse model code that does anything but import from a few modules and define classes.

    See `_ModelChecker` for why strings in types, rebound names and most calls are refused.

    Raises:
        UnsafeModelCode: names the first construct outside the allowlist, its line and its class and field.
    """
    _ModelChecker().module(tree)


class _Renamer(ast.NodeTransformer):
    """Renames classes and the references to them; fields (names stored in a class body) keep their names."""

    def __init__(self, mapping: dict[str, str]) -> None:
        self.mapping = mapping

    def visit_Name(self, node: ast.Name) -> ast.Name:
        if isinstance(node.ctx, ast.Load):
            node.id = self.mapping.get(node.id, node.id)
        return node

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.ClassDef:
        node.name = self.mapping.get(node.name, node.name)
        self.generic_visit(node)
        return node


def _defined_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.ImportFrom):
            names.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(target.id for target in targets if isinstance(target, ast.Name))
    return names


def check_model_runs(code: str, roots: tuple[str, ...] = ("Params",)) -> None:
    """Execute already-checked model code in a throwaway module; each of `roots` must be a working model."""
    from pydantic import BaseModel

    name = "_ipybox_model_check"
    module = types.ModuleType(name)
    sys.modules[name] = module
    try:
        exec(compile(code, f"<{name}>", "exec"), module.__dict__)  # noqa: S102 (allowlisted code)
        for root in roots:
            model = module.__dict__.get(root)
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                raise UnsafeModelCode(f"the model code does not define a {root} model")
            model.model_json_schema()
    finally:
        del sys.modules[name]


def model_code(input_schema: dict[str, Any], root: str = "Params") -> str:
    """Pydantic v2 code defining `root` (and the models it uses) for a tool's input (or output) schema.

    Raises:
        Exception: datamodel-code-generator failed, or its output failed a check (see module doc).
    """
    from datamodel_code_generator import DataModelType, InputFileType, PythonVersion, generate

    schema = dict(input_schema)
    schema.pop("title", None)
    with tempfile.TemporaryDirectory() as empty:
        # An empty working directory: relative file $refs find nothing; remote $refs are refused.
        cwd = os.getcwd()
        os.chdir(empty)
        try:
            code = generate(
                json.dumps(schema),
                input_file_type=InputFileType.JsonSchema,
                output_model_type=DataModelType.PydanticV2BaseModel,
                class_name=_ROOT_CLASS,
                target_python_version=PythonVersion.PY_311,
                allow_remote_refs=False,
                formatters=[],
                disable_timestamp=True,
                use_union_operator=True,
                use_standard_collections=True,
            )
        finally:
            os.chdir(cwd)
    if not isinstance(code, str):
        raise UnsafeModelCode("datamodel-code-generator produced more than one module")
    tree = ast.parse(code)
    defined = _defined_names(tree)
    if _ROOT_CLASS not in defined:
        raise UnsafeModelCode("the root model is missing")
    renamed = f"{root}_"
    while renamed in defined:
        renamed += "_"
    tree = ast.fix_missing_locations(_Renamer({root: renamed, _ROOT_CLASS: root}).visit(tree))
    result = ""
    for index, statement in enumerate(tree.body):
        separator = "\n\n\n" if index and isinstance(statement, ast.ClassDef) else "\n"
        result += (separator if index else "") + ast.unparse(statement)
    result += "\n"
    # The code that runs and is written out, after renaming (a rename could make a field shadow a name).
    check_model_code(ast.parse(result))
    check_model_runs(result, (root,))
    return result


def is_wrapped(output_schema: dict[str, Any]) -> bool:
    """Whether an output schema is the SDK's wrapping of a non-object return value (`-> str`, `-> int`).

    Both SDK generations (FastMCP in mcp 1.x, MCPServer in 2.x) declare `{"result": <value>}` as the
    structured content of such a tool, an object with the single required property `result`.
    """
    properties = output_schema.get("properties")
    return (
        output_schema.get("type", "object") == "object"
        and isinstance(properties, dict)
        and list(properties) == ["result"]
        and output_schema.get("required") == ["result"]
        and not output_schema.get("additionalProperties")
    )


def merge_result_code(params_code: str, result_code: str) -> tuple[str, str]:
    """`params_code` with the classes of `result_code` (root class `Result`) appended; and the root's name.

    The result's classes are renamed where they collide with names of `params_code` (`Address` ->
    `Address_`; `Result` too, if the input model has one); imports the two share are kept once.

    Raises:
        UnsafeModelCode: an import of the result code binds a name of the params code to something else,
            or the merged code fails the checks.
    """
    params_tree = ast.parse(params_code)
    result_tree = ast.parse(result_code)
    taken = _defined_names(params_tree) | _MODULE_NAMES
    origins = {
        alias.asname or alias.name: (node.module, alias.name)
        for node in params_tree.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    result_classes = [node.name for node in result_tree.body if isinstance(node, ast.ClassDef)]
    mapping: dict[str, str] = {}
    used = taken | set(result_classes)
    for name in ["Result", *(name for name in result_classes if name != "Result")]:
        if name in taken:
            candidate = f"{name}_"
            while candidate in used:
                candidate += "_"
            mapping[name] = candidate
            used.add(candidate)
    body: list[ast.stmt] = []
    for node in result_tree.body:
        if isinstance(node, ast.ImportFrom):
            if node.module == "__future__":
                continue
            kept = []
            for alias in node.names:
                bound = alias.asname or alias.name
                if bound in origins and origins[bound] == (node.module, alias.name):
                    continue
                if bound in taken or bound in mapping.values():
                    raise UnsafeModelCode(f"the output model's import of {bound!r} collides with the input model")
                kept.append(alias)
            if kept:
                body.append(ast.ImportFrom(module=node.module, names=kept, level=0))
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a module docstring
        body.append(node)
    renamed = ast.fix_missing_locations(_Renamer(mapping).visit(ast.Module(body=body, type_ignores=[])))
    root = mapping.get("Result", "Result")
    merged = params_code.rstrip("\n")
    for index, statement in enumerate(renamed.body):
        separator = "\n\n\n" if not index or isinstance(statement, ast.ClassDef) else "\n"
        merged += separator + ast.unparse(statement)
    merged += "\n"
    check_model_code(ast.parse(merged))
    check_model_runs(merged, ("Params", root))
    return merged, root


def _root_unwrap(code: str, root: str, wrapped: bool) -> tuple[str, str] | None:
    """(attribute, annotation) of the value inside model `root`: its `result` field or a RootModel's `root`."""
    for node in ast.parse(code).body:
        if isinstance(node, ast.ClassDef) and node.name == root:
            if wrapped:
                for statement in node.body:
                    if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                        if statement.target.id == "result":
                            return "result", ast.unparse(statement.annotation)
            for base in node.bases:
                if (
                    isinstance(base, ast.Subscript)
                    and isinstance(base.value, ast.Name)
                    and base.value.id == "RootModel"
                ):
                    return "root", ast.unparse(base.slice)
    return None


# -- modules --------------------------------------------------------------------------------------


def render_tool_module(
    server_name: str,
    tool_name: str,
    func_name: str,
    description: str | None,
    params_code: str,
    schema_note: str = "",
    output: str | None = None,
    unwrap: str | None = None,
    returns: str = "str",
) -> str:
    """Source of one tool module: the models and `<func_name>(params: Params) -> <returns>`.

    `params_code` must define `Params` (and the class `output`, if that is not None or `"dict"`) and start
    with `from __future__ import annotations` (if at all). `output` is passed on to `call_tool`; `unwrap`
    names the field (or dict key, for `"dict"`) the function returns instead of the whole value;
    `returns` is its annotation, taken from checked model code. Only `server_name` (an identifier),
    `func_name` (sanitized) and these names from checked code appear outside literals.
    """
    if not server_name.isidentifier() or not func_name.isidentifier() or keyword.iskeyword(func_name):
        raise ValueError("server_name and func_name must be identifiers")
    if output is not None and not output.isidentifier():
        raise ValueError("output must be an identifier")
    if unwrap is not None and not unwrap.isidentifier():
        raise ValueError("unwrap must be an identifier")
    defined = _defined_names(ast.parse(params_code)) | _MODULE_NAMES
    while func_name in defined or func_name in vars(builtins):
        func_name += "_"
    call = "_call_tool(_SERVER_NAME, _TOOL_NAME, params)"
    if output is not None:
        call = f"_call_tool(_SERVER_NAME, _TOOL_NAME, params, {output})"
        if unwrap is not None:
            call += f"[{unwrap!r}]" if output == "dict" else f".{unwrap}"
    lines = []
    if description:
        lines.append(docstring_literal(description))
    lines.append(f"# Generated by ipybox from MCP server {server_name}: regenerate instead of editing.")
    lines.append("")
    lines.append(params_code.rstrip("\n"))
    if schema_note:
        lines.append(schema_note.rstrip("\n"))
    function_doc = description or f"Call the MCP tool {tool_name!r}."
    lines += [
        "",
        "from ipybox_server.mcp_runtime import call_tool as _call_tool",
        "",
        "from . import SERVER_NAME as _SERVER_NAME",
        "",
        f"_TOOL_NAME = {literal(tool_name)}",
        "",
        "",
        f"def {func_name}(params: Params) -> {returns}:",
        f"    {docstring_literal(function_doc, indent='    ')}",
        f"    return {call}",
        "",
    ]
    source = "\n".join(lines)
    compile(source, f"<{func_name}>", "exec")
    return source


def _fallback_note(name: str, schema: Any, reason: str) -> str:
    try:
        note = f"\n_{name}_SCHEMA = {literal(schema)}\n"
    except ValueError:
        note = f"\n_{name}_SCHEMA = None\n"
    prefix = "" if name == "INPUT" else f"{name}_"
    return note + f"_{prefix}MODEL_ERROR = {literal(reason)}\n"


def tool_module(
    server_name: str,
    tool_name: str,
    func_name: str,
    description: str | None,
    schema: Any,
    output_schema: Any = None,
) -> str:
    """The source of one tool module; a permissive model when the schema cannot be turned into code.

    With an output schema (an object), the function returns the structured content: validated into a
    `Result` model, or unwrapped to the value of a wrapped `-> str`/`-> int` tool (`is_wrapped`) or of a
    RootModel; as plain JSON data when the schema gives no model. Without one, it returns the text.
    """
    note = ""
    try:
        if not isinstance(schema, dict):
            raise UnsafeModelCode("the input schema is not an object")
        code = model_code(schema)
    except Exception as exc:  # any failure of the generator or of our checks: fall back, never fail the server
        code = FALLBACK_MODEL
        note = _fallback_note(
            "INPUT", schema, f"the input schema of tool {tool_name!r} gave no model: {type(exc).__name__}: {exc}"
        )
    output: str | None = None
    unwrap: str | None = None
    returns = "str"
    if isinstance(output_schema, dict):
        wrapped = is_wrapped(output_schema)
        try:
            code, root = merge_result_code(code, model_code(output_schema, "Result"))
            output, returns = root, root
            inner = _root_unwrap(code, root, wrapped)
            if inner is not None:
                unwrap, returns = inner
        except Exception as exc:  # the structured content is then returned as JSON data
            output, unwrap, returns = "dict", ("result" if wrapped else None), ("object" if wrapped else "dict")
            note += _fallback_note(
                "OUTPUT",
                output_schema,
                f"the output schema of tool {tool_name!r} gave no model: {type(exc).__name__}: {exc}",
            )
    return render_tool_module(server_name, tool_name, func_name, description, code, note, output, unwrap, returns)


EXPORTED_ERRORS = (
    "ToolApprovalExpired",
    "ToolCallError",
    "ToolDenied",
    "ToolError",
    "ToolServerCrashed",
    "ToolServerError",
    "ToolTimeout",
)
"""The exceptions a tool function raises (`mcp_runtime`), re-exported by every package."""


def render_init(server_name: str, modules: dict[str, str]) -> str:
    if not server_name.isidentifier():
        raise ValueError("server_name must be an identifier")
    # `from <package> import ToolError`, ... (unless a tool module takes the name).
    names = [name for name in EXPORTED_ERRORS if name not in modules.values()]
    exports = [f"from ipybox_server.mcp_runtime import {', '.join(names)}", ""] if names else []
    return "\n".join(
        [
            f'"""Generated by ipybox: client modules for the tools of MCP server {server_name}.',
            "",
            "The server's parameters are not here: ipybox's tool service holds them and the server's session.",
            '"""',
            "",
            *exports,
            f"SERVER_NAME = {literal(server_name)}",
            "",
            "# tool name -> module name",
            f"TOOLS = {literal(modules)}",
            "",
        ]
    )


def render_package(server_name: str, tools: list[dict[str, Any]]) -> dict[str, str]:
    """File name -> source for the package; `tools` are dicts with name, description, input_schema, output_schema."""
    by_name: dict[str, dict[str, Any]] = {}
    for tool in tools:
        by_name.setdefault(tool["name"], tool)
    names = module_names(list(by_name))
    files = {"__init__.py": render_init(server_name, names)}
    for tool_name, module in names.items():
        tool = by_name[tool_name]
        files[f"{module}.py"] = tool_module(
            server_name, tool_name, module, tool.get("description"), tool.get("input_schema"), tool.get("output_schema")
        )
    return files


# -- writing --------------------------------------------------------------------------------------

_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()


def write_package(target: Path, files: dict[str, str]) -> None:
    """Write the package into a fresh directory next to `target`, then swap it in (atomic where possible)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        for name, text in files.items():
            (staging / name).write_text(text, encoding="utf-8")
        staging.chmod(0o755)
        if not os.path.lexists(target):
            try:
                os.rename(staging, target)
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
        if not _exchange(staging, target):
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.rename(target, old / "package")
            os.rename(staging, target)
            staging = old
    finally:
        _remove(staging)  # after a swap: the old package


# -- talking to the server ------------------------------------------------------------------------


def _failure_message(exc: BaseException, errlog: Any) -> str:
    from ipybox_server.mcp_call import leaf_exception, stderr_tail

    leaf = leaf_exception(exc)
    message = f"{type(leaf).__name__}: {leaf}" if str(leaf) else type(leaf).__name__
    tail = stderr_tail(errlog)
    return f"{message}; server stderr: {tail}" if tail else message


async def list_tools(server_params: dict[str, Any], timeout: float = LIST_TIMEOUT) -> list[dict[str, Any]]:
    """The server's tools as dicts (name, description, input_schema, output_schema).

    Raises:
        GenerationError: the server could not be reached, failed, or did not answer in time.
    """
    import anyio

    from ipybox_server.mcp_call import connect

    tools: list[dict[str, Any]] = []
    with tempfile.TemporaryFile() as errlog:
        try:
            with anyio.fail_after(timeout):
                async with connect(server_params, errlog) as client:
                    cursor = None
                    for _ in range(MAX_PAGES):
                        page = await client.list_tools(cursor=cursor)
                        tools += [
                            {
                                "name": t.name,
                                "description": t.description,
                                "input_schema": t.input_schema,
                                "output_schema": t.output_schema,
                            }
                            for t in page.tools
                        ]
                        cursor = page.next_cursor
                        if not cursor:
                            break
        except TimeoutError as exc:
            raise GenerationError(f"the MCP server did not list its tools within {timeout:g} s") from exc
        except Exception as exc:
            raise GenerationError(f"the MCP server failed: {_failure_message(exc, errlog)}") from exc
    return tools


async def generate(
    target: Path, server_params: dict[str, Any] | None, tools: list[dict[str, Any]] | None = None
) -> list[str]:
    """Write the package for the tools of the server at `server_params`, or for `tools` as given."""
    if tools is None:
        try:
            params = mcp_params.normalize(server_params)
        except mcp_params.ParamsError as exc:
            raise GenerationError(str(exc), 400) from exc
        tools = await list_tools(params)
    files = await asyncio.to_thread(render_package, target.name, tools)
    await asyncio.to_thread(write_package, target, files)
    return sorted(name.removesuffix(".py") for name in files if name != "__init__.py")


def main() -> None:
    # Before the request (with the server's env or headers) is read: a non-dumpable process's memory,
    # environment and command line are out of reach of the kernels, which run as the same user.
    protect_process()
    answer = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # stray prints of libraries must not corrupt the answer
    sys.stdout = sys.stderr
    try:
        request = json.loads(sys.stdin.read())
        modules = asyncio.run(generate(Path(request["target"]), request.get("server_params"), request.get("tools")))
        result: dict[str, Any] = {"modules": modules}
    except GenerationError as exc:
        result = {"error": str(exc), "status": exc.status}
    except Exception as exc:
        result = {"error": f"generation failed: {type(exc).__name__}: {exc}", "status": 500}
    answer.write(json.dumps(result))
    answer.close()


if __name__ == "__main__":
    main()
