"""The sandbox user's uid/gid: the builder's, never 0 unless a root image is asked for."""

from __future__ import annotations

from ipybox._build.user import SandboxUser, sandbox_user


def test_builder_ids_are_used() -> None:
    assert sandbox_user(False, uid=1234, gid=4321) == SandboxUser(1234, 4321, "/home/ipybox")


def test_root_builder_falls_back_to_1000() -> None:
    assert sandbox_user(False, uid=0, gid=0) == SandboxUser(1000, 1000, "/home/ipybox")
    assert sandbox_user(False, uid=1234, gid=0) == SandboxUser(1000, 1000, "/home/ipybox")
    assert sandbox_user(False, uid=0, gid=1234) == SandboxUser(1000, 1000, "/home/ipybox")


def test_root_image() -> None:
    assert sandbox_user(True, uid=1234, gid=1234) == SandboxUser(0, 0, "/root")


def test_defaults_to_this_process() -> None:
    user = sandbox_user(False)
    assert user.uid != 0 and user.gid != 0
