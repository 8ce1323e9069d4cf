"""Reading a user's dependencies file (`ipybox build -d FILE`).

Two formats are accepted, even mixed: the body of a pyproject `dependencies = [...]` array
(`"numpy>=2.1,<3",`) and requirements.txt lines (`numpy>=2.1,<3`). Every requirement is validated here,
before any Docker call, so a typo fails in milliseconds with the file and line number instead of minutes
into a build.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement

from .._errors import BuildError, DependencyFileError

# `dependencies = [`, `[`, `]` and `],` carry no requirement: the pyproject array's frame.
_ARRAY_FRAME = re.compile(r"^(?:[A-Za-z_][\w.-]*\s*=\s*)?\[$|^\],?$")
# A quoted item `"spec"` or `'spec'`, with an optional comma after it.
_QUOTED = re.compile(r"""\s*(["'])(.*?)\1\s*(?:,|$|(?=#))""")
# requirements.txt comments start a line or follow whitespace (`pkg @ url#frag` is not a comment).
_COMMENT = re.compile(r"(?:^|\s)#.*$")


def parse_dependencies(path: Path) -> list[str]:
    """Reads and validates a dependencies file.

    Args:
        path: a requirements.txt-style file or the lines of a pyproject `dependencies` array.

    Returns:
        The normalized requirement strings, in file order (empty when the file has none).

    Raises:
        DependencyFileError: a line is not a valid requirement (names file and line number).
        BuildError: the file cannot be read.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BuildError(f"Cannot read dependencies file {path}: {exc}") from exc
    return parse_dependency_lines(text.splitlines(), source=str(path))


def parse_dependency_lines(lines: Iterable[str], source: str) -> list[str]:
    """Validates dependency lines; `source` names the file in errors. See `parse_dependencies`."""
    requirements: list[str] = []
    for number, line in enumerate(lines, start=1):
        for spec in _specs_of(line, source, number):
            try:
                requirement = Requirement(spec)
            except InvalidRequirement as exc:
                # packaging's message is multi-line (it draws a caret); the first line says what is wrong.
                reason = str(exc).splitlines()[0] if str(exc) else "invalid requirement"
                if spec.startswith("-"):
                    reason = "pip options are not supported here (configure indexes in pip's config)"
                raise DependencyFileError(source, number, line, reason) from exc
            requirements.append(str(requirement))
    return requirements


def _specs_of(line: str, source: str, number: int) -> list[str]:
    stripped = line.strip()
    if not stripped or stripped.startswith("#") or _ARRAY_FRAME.match(stripped):
        return []
    if stripped[0] in "\"'":
        return _quoted_specs(stripped, line, source, number)
    return [_COMMENT.sub("", stripped).strip()]


def _quoted_specs(stripped: str, line: str, source: str, number: int) -> list[str]:
    specs: list[str] = []
    position = 0
    while position < len(stripped):
        rest = stripped[position:]
        if not rest.strip() or rest.lstrip().startswith("#"):
            break
        match = _QUOTED.match(stripped, position)
        if match is None:
            raise DependencyFileError(source, number, line, "unbalanced quotes or text after the quoted item")
        specs.append(match.group(2).strip())
        position = match.end()
    return specs
