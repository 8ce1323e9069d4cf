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
from ipybox.resource import _beneath


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


async def test_allowed_paths_lie_below_an_allowed_dir_with_no_symlink(tmp_path: Path) -> None:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "inside").mkdir()
    os.symlink(outside, allowed / "escape")
    os.symlink(allowed / "inside", allowed / "within")  # even a link pointing inside is not followed
    os.symlink(allowed / "inside", tmp_path / "alias")  # nor one leading into the allowed directory
    sandbox = Sandbox(SandboxOptions(tag="t", allowed_dirs=[allowed]))
    try:
        assert sandbox.allowed_path(str(allowed / "f.txt")) == allowed.resolve() / "f.txt"
        assert sandbox.allowed_path("rel/f.txt") == allowed.resolve() / "rel" / "f.txt"
        assert sandbox.allowed_path("inside/../f.txt") == allowed.resolve() / "f.txt"
        assert sandbox.allowed_path("missing/deeper/f.txt") == allowed.resolve() / "missing" / "deeper" / "f.txt"
        for bad in [
            str(outside / "f.txt"),
            str(allowed / ".." / "outside" / "f"),
            "../outside/f",
            str(tmp_path / "alias" / "f.txt"),
        ]:
            with pytest.raises(PathNotAllowedError, match=f"outside the allowed directories: {allowed}"):
                sandbox.allowed_path(bad)
        for bad, link in [
            (str(allowed / "escape" / "f.txt"), allowed / "escape"),
            (str(allowed / "within" / "f.txt"), allowed / "within"),
            (str(allowed / "within"), allowed / "within"),
        ]:
            with pytest.raises(PathNotAllowedError, match=f"goes through the symbolic link {link}: .*{allowed}"):
                sandbox.allowed_path(bad)
    finally:
        await sandbox.close()


async def test_allowed_dirs_are_used_through_the_descriptor_opened_first(tmp_path: Path) -> None:
    """A directory swapped for a symlink after it was opened: paths below it still reach the original."""
    parent, outside = tmp_path / "parent", tmp_path / "outside"
    (parent / "allowed").mkdir(parents=True)
    outside.mkdir()
    (outside / "f.txt").write_text("outside")
    (parent / "allowed" / "f.txt").write_text("allowed")
    sandbox = Sandbox(SandboxOptions(tag="t", allowed_dirs=[parent / "allowed"]))
    try:
        sandbox.allowed_path("f.txt")  # opens the allowed directories (Sandbox.start does, in the server)
        os.rename(parent / "allowed", parent / "moved")
        os.symlink(outside, parent / "allowed")
        path = sandbox.allowed_path(str(parent / "allowed" / "f.txt"))
        fd = _beneath.open_file(path, root=sandbox._allowed.root_of(path))
        with os.fdopen(fd, "rb") as file:
            assert file.read() == b"allowed"
    finally:
        await sandbox.close()
