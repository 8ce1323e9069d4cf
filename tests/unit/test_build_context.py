"""The build context: Dockerfile contract, files, and byte-for-byte determinism."""

from __future__ import annotations

import gzip
import io
import re
import tarfile
from pathlib import Path

import pytest

from ipybox import _labels
from ipybox._build.context import IMAGE_DIR, build_args, context_files, context_tar
from ipybox._build.pip_settings import PipSettings
from ipybox._build.user import SandboxUser
from ipybox._errors import BuildError
from ipybox._version import __version__

DOCKERFILE = (IMAGE_DIR / "Dockerfile").read_text()


def instructions() -> list[str]:
    """Dockerfile instructions with continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_uses_the_label_keys() -> None:
    label = instructions()[-1]
    assert label.startswith("LABEL ")
    for key in (_labels.IMAGE_LABEL, _labels.VERSION_LABEL, _labels.UID_LABEL, _labels.GID_LABEL):
        assert key in label


def test_dockerfile_layer_order() -> None:
    steps = instructions()
    index = {
        name: next(i for i, s in enumerate(steps) if name in s)
        for name in (
            "COPY pip/",
            "requirements-core.txt /opt",
            "dependencies.txt /opt",
            "ARG IPYBOX_UID",
            "COPY ipybox_server/",
            "USER ",
            "LABEL ",
        )
    }
    assert list(index.values()) == sorted(index.values())


def test_dockerfile_runtime_contract() -> None:
    steps = instructions()
    assert 'CMD ["/opt/ipybox/venv/bin/python", "-I", "-m", "ipybox_server"]' in steps
    assert "WORKDIR /app" in steps
    assert "EXPOSE 8888 8900" in steps
    assert f"EXPOSE {_labels.EXECUTOR_PORT} {_labels.RESOURCE_PORT}" in steps
    env = next(s for s in steps if s.startswith("ENV PATH="))
    for setting in (
        "PATH=/opt/ipybox/venv/bin:$PATH",
        "PYTHONPATH=/app",
        "MPLBACKEND=module://matplotlib_inline.backend_inline",
        "PYTHONUNBUFFERED=1",
        "NO_COLOR=1",
        "LANG=C.UTF-8",
    ):
        assert setting in env
    assert "USER ${IPYBOX_UID}:${IPYBOX_GID}" in steps
    assert "chmod 0700 /run/ipybox" in DOCKERFILE
    assert str(Path(_labels.TOKEN_PATH).parent) == "/run/ipybox"


def test_core_requirements() -> None:
    lines = [
        line
        for line in (IMAGE_DIR / "requirements-core.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines == [
        "jupyter_kernel_gateway>=3",
        "ipykernel>=6.29",
        "aiohttp>=3.10",
        "matplotlib",
        "pandas",
        "pillow",
        "mcp>=2.3,<3",
        "datamodel-code-generator>=0.89,<1",
        "dnspython>=2.6",
    ]


def test_build_args() -> None:
    assert build_args("base:1", SandboxUser(1000, 1001, "/home/ipybox")) == {
        "BASE_IMAGE": "base:1",
        "IPYBOX_UID": "1000",
        "IPYBOX_GID": "1001",
        "IPYBOX_HOME": "/home/ipybox",
        "IPYBOX_VERSION": __version__,
    }


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    (tmp_path / "requirements-core.txt").write_text("six\n")
    server = tmp_path / "ipybox_server"
    (server / "__pycache__").mkdir(parents=True)
    (server / "__init__.py").write_text("")
    (server / "__main__.py").write_text("print('hi')\n")
    (server / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"x")
    (server / ".hidden").write_text("")
    return tmp_path


def test_context_files(image_dir: Path, tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_bytes(b"PEM")
    files = context_files(["six", "attrs>=23"], PipSettings(cert=ca), image_dir)
    assert sorted(files) == [
        "Dockerfile",
        "dependencies.txt",
        "ipybox_server/__init__.py",
        "ipybox_server/__main__.py",
        "pip/ca.pem",
        "pip/pip.conf",
        "requirements-core.txt",
    ]
    assert files["dependencies.txt"] == b"six\nattrs>=23\n"
    assert files["pip/ca.pem"] == b"PEM"
    assert b"cert = /etc/ipybox/pip/ca.pem" in files["pip/pip.conf"]


def test_no_dependencies_give_an_empty_file_and_no_ca_without_cert(image_dir: Path) -> None:
    files = context_files([], PipSettings(), image_dir)
    assert files["dependencies.txt"] == b""
    assert "pip/ca.pem" not in files


def test_missing_server_package_is_a_build_error(image_dir: Path) -> None:
    import shutil

    shutil.rmtree(image_dir / "ipybox_server")
    with pytest.raises(BuildError, match="server package is missing"):
        context_files([], PipSettings(), image_dir)


def test_context_tar_is_deterministic_and_complete() -> None:
    files = {"Dockerfile": b"FROM x\n", "pip/pip.conf": b"[global]\n", "ipybox_server/a.py": b""}
    first = context_tar(files)
    assert context_tar(dict(reversed(list(files.items())))) == first
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(first))) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert list(members) == sorted(members)
        assert set(members) == {"Dockerfile", "ipybox_server", "ipybox_server/a.py", "pip", "pip/pip.conf"}
        assert all(m.mtime == 0 and m.uid == 0 for m in members.values())
        assert members["pip"].isdir()


def test_empty_server_package_still_has_its_directory() -> None:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(context_tar({"Dockerfile": b""})))) as tar:
        assert tar.getmember("ipybox_server").isdir()


def test_real_image_dir_assembles() -> None:
    files = context_files([], PipSettings(), IMAGE_DIR)
    assert any(name.startswith("ipybox_server/") for name in files)
    assert not any("__pycache__" in name for name in files)
