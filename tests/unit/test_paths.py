"""`paths.resolve` of the resource server: every refusal is a 400 and names the reason.

The server package runs in the container only; it has no container dependency, so it is imported from
the source tree here.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "ipybox" / "_image"))

from ipybox_server.paths import resolve  # noqa: E402


@pytest.fixture
def root(tmp_path: Path) -> Path:
    app = tmp_path / "app"
    (app / "sub").mkdir(parents=True)
    (app / "sub" / "file.txt").write_text("x")
    (tmp_path / "app-sibling").mkdir()
    (tmp_path / "outside.txt").write_text("secret")
    return app


def refusal(relpath: str, root: Path, **kwargs: bool) -> str:
    with pytest.raises(web.HTTPBadRequest) as info:
        resolve(relpath, root=root, **kwargs)
    assert info.value.content_type == "application/json"
    message: str = json.loads(info.value.text or "")["error"]
    return message


def test_relative_paths_resolve_under_the_root(root: Path) -> None:
    assert resolve("sub/file.txt", root=root) == root / "sub" / "file.txt"
    assert resolve("new/dir/file", root=root) == root / "new" / "dir" / "file"
    assert resolve("./sub//file.txt", root=root) == root / "sub" / "file.txt"
    # Only the traversal check decodes once more; the name itself is taken literally.
    assert resolve("sub/%2e%2e-literal", root=root) == root / "sub" / "%2e%2e-literal"


@pytest.mark.parametrize(
    "relpath",
    [
        "..",
        "../outside.txt",
        "sub/../../outside.txt",
        "sub/..",
        "%2e%2e/outside.txt",  # one more round of decoding than the server's router did
        "%2E%2E%2Foutside.txt",
        "sub/%2e%2e%2f%2e%2e%2foutside.txt",
        "..%2foutside.txt",
    ],
)
def test_traversal_is_refused(root: Path, relpath: str) -> None:
    assert "'..'" in refusal(relpath, root)


@pytest.mark.parametrize("relpath", ["/etc/passwd", "%2fetc%2fpasswd", "//etc"])
def test_absolute_paths_are_refused(root: Path, relpath: str) -> None:
    assert "relative" in refusal(relpath, root)


@pytest.mark.parametrize("relpath", ["file\x00.txt", "file%00.txt", "sub/\x00"])
def test_nul_bytes_are_refused(root: Path, relpath: str) -> None:
    assert "NUL" in refusal(relpath, root)


def test_symlink_out_of_the_root_is_refused(root: Path, tmp_path: Path) -> None:
    (root / "escape").symlink_to(tmp_path)
    (root / "escape-file").symlink_to(tmp_path / "outside.txt")
    (root / "sub" / "up").symlink_to("../..")
    for relpath in ["escape/outside.txt", "escape", "escape-file", "sub/up/outside.txt", "escape/new-file"]:
        assert "outside" in refusal(relpath, root)


def test_sibling_with_the_same_prefix_is_outside(root: Path, tmp_path: Path) -> None:
    # "/x/app-sibling" starts with "/x/app" as a string, not as a path.
    (root / "sib").symlink_to(tmp_path / "app-sibling")
    assert "outside" in refusal("sib/file", root)


def test_symlink_inside_the_root_resolves_to_its_target(root: Path) -> None:
    (root / "alias").symlink_to("sub")
    assert resolve("alias/file.txt", root=root) == root / "sub" / "file.txt"


def test_root_itself_only_when_allowed(root: Path) -> None:
    (root / "self").symlink_to(".")
    assert "empty" in refusal("", root)
    assert "empty" in refusal(".", root)
    assert "/app itself" in refusal("self", root)
    assert resolve("", root=root, allow_root=True) == root
    assert resolve(".", root=root, allow_root=True) == root


def test_root_given_through_a_symlink(tmp_path: Path, root: Path) -> None:
    link = tmp_path / "app-link"
    os.symlink(root, link)
    assert resolve("sub/file.txt", root=link) == root / "sub" / "file.txt"
