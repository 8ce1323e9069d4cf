import os
from pathlib import Path

import pytest

from ipybox._mcp_session import (
    PathNotAllowedError,
    Sandbox,
    SandboxOptions,
    parse_binds,
    parse_env_file,
    parse_key_values,
    truncate_middle,
)


def test_truncate_middle_keeps_both_ends_and_says_what_was_cut() -> None:
    text = "a" * 50 + "b" * 1000 + "c" * 50
    cut = truncate_middle(text, 100, "/app/.ipybox/outputs/x.txt")
    assert cut.startswith("a" * 50) and cut.endswith("c" * 50)
    assert "[... 1,000 characters omitted; full output saved to /app/.ipybox/outputs/x.txt ...]" in cut
    assert "bb" not in cut


def test_key_values_and_env_file(tmp_path: Path) -> None:
    assert parse_key_values(["A=1", "B=x=y", "C="], "--x") == {"A": "1", "B": "x=y", "C": ""}
    with pytest.raises(ValueError, match="'NOEQUALS' is not KEY=VALUE"):
        parse_key_values(["NOEQUALS"], "--container-env-var")
    env = tmp_path / "env"
    env.write_text("# comment\n\nexport A=1\nB='two words'\nC=\"q\"\n")
    assert parse_env_file(env) == {"A": "1", "B": "two words", "C": "q"}
    env.write_text("A=1\nbroken\n")
    with pytest.raises(ValueError, match="line 2"):
        parse_env_file(env)


def test_binds() -> None:
    assert parse_binds(["/data:data", "rel:sub/dir"]) == {"/data": "data", "rel": "sub/dir"}
    for bad in ["/abs:/abs", "nocolon", "/x:../up", ":data"]:
        with pytest.raises(ValueError, match="--container-bind"):
            parse_binds([bad])


def test_allowed_paths_resolve_symlinks(tmp_path: Path) -> None:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    os.symlink(outside, allowed / "escape")
    sandbox = Sandbox(SandboxOptions(tag="t", allowed_dirs=[allowed]))
    assert sandbox.allowed_path(str(allowed / "f.txt")) == allowed.resolve() / "f.txt"
    assert sandbox.allowed_path("rel/f.txt") == allowed.resolve() / "rel" / "f.txt"
    for bad in [str(outside / "f.txt"), str(allowed / "escape" / "f.txt"), str(allowed / ".." / "outside" / "f")]:
        with pytest.raises(PathNotAllowedError, match=str(allowed)):
            sandbox.allowed_path(bad)
