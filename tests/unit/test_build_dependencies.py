"""Parsing of `ipybox build -d FILE`: both formats, comments, and errors that name the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from ipybox._build.dependencies import parse_dependencies, parse_dependency_lines
from ipybox._errors import BuildError, DependencyFileError


def parse(text: str) -> list[str]:
    return parse_dependency_lines(text.splitlines(), source="deps.txt")


def test_requirements_txt_lines_are_normalized() -> None:
    assert parse("numpy >= 2.1, <3\nsix\nrequests[socks]==2.32.3\n") == [
        "numpy<3,>=2.1",
        "six",
        "requests[socks]==2.32.3",
    ]


def test_pyproject_array_lines_with_either_quotes_and_optional_comma() -> None:
    text = """
dependencies = [
    "numpy>=2.1,<3",
    'six',
    "pandas"
]
"""
    assert parse(text) == ["numpy<3,>=2.1", "six", "pandas"]


def test_several_quoted_items_on_one_line() -> None:
    assert parse('"six", "attrs>=23",') == ["six", "attrs>=23"]


def test_blank_lines_and_comments_are_ignored() -> None:
    text = """
# a full-line comment
six  # trailing comment
  "attrs",  # trailing comment after a quoted item
"idna" # no comma
],
"""
    assert parse(text) == ["six", "attrs", "idna"]


def test_markers_survive() -> None:
    assert parse("""tomli; python_version < "3.11\"""") == ['tomli; python_version < "3.11"']


def test_hash_inside_a_url_is_not_a_comment() -> None:
    [requirement] = parse("pkg @ https://example.com/pkg.zip#sha256=abc")
    assert requirement.endswith("https://example.com/pkg.zip#sha256=abc")


def test_empty_file_gives_no_requirements() -> None:
    assert parse("") == []
    assert parse("dependencies = [\n]\n") == []


@pytest.mark.parametrize(
    ("text", "line_number"),
    [
        ("six\nnumpy>=\n", 2),
        ("six\n\n# c\nfoo bar\n", 4),
        ('dependencies = [\n  "six",\n  "numpy>=2,\n]', 3),  # unbalanced quote
        ("six\n-r other.txt\n", 2),
        ('"six" "attrs"', 1),
    ],
)
def test_malformed_line_names_its_number(text: str, line_number: int) -> None:
    with pytest.raises(DependencyFileError) as info:
        parse(text)
    assert info.value.line_number == line_number
    assert info.value.path == "deps.txt"
    assert f"deps.txt, line {line_number}:" in str(info.value)


def test_pip_options_get_a_helpful_reason() -> None:
    with pytest.raises(DependencyFileError, match="pip options are not supported"):
        parse("--index-url https://example.com/simple")


def test_parse_dependencies_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "deps.txt"
    path.write_text('"six",\nbad line here\n')
    with pytest.raises(DependencyFileError) as info:
        parse_dependencies(path)
    assert info.value.path == str(path)
    assert info.value.line_number == 2


def test_missing_file_is_a_build_error(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="Cannot read dependencies file"):
        parse_dependencies(tmp_path / "missing.txt")
