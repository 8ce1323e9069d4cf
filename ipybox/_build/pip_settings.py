"""The host's pip settings, passed into the image build as pip's and uv's configuration files.

Where the host reaches PyPI through a mirror or a TLS-intercepting proxy, pip and uv inside the build (and
in cells and MCP servers later) need the same index URLs and CA bundle. We read them from `pip config list`
and the `PIP_*` environment, keep what is meaningful inside a container (http(s) URLs, the CA bundle's
content) and drop host paths such as `file://` indexes or local find-links, which do not exist inside the
build. The CA bundle joins the image's system store, which both files point at.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CA_BUNDLE_IN_IMAGE = "/etc/ssl/certs/ca-certificates.crt"
"""The image's system CA store; the Dockerfile adds the host's certificates (`host/ca.pem`) to it."""

KERNEL_CONSTRAINTS_IN_IMAGE = "/etc/ipybox/kernel-constraints.txt"
"""Floors under the kernel's own packages, applied by pip to every install in the image."""

# `global.index-url='https://…'`, `:env:.cert='/etc/…'`
_CONFIG_LINE = re.compile(r"^(?P<section>[^.\s]*)\.(?P<key>[\w-]+)=(?P<quote>['\"]?)(?P<value>.*)(?P=quote)$")

# pip's precedence for `pip install`: environment over the `install` section over `global`.
_SECTIONS = (":env:", "install", "global")


@dataclass(frozen=True)
class PipSettings:
    """The subset of pip's configuration that is carried into the image.

    Attributes:
        index_url: replaces PyPI as the main index (http(s) only).
        extra_index_urls: additional indexes (http(s) only).
        trusted_hosts: hosts pip may reach without valid TLS.
        find_links: http(s) pages with links to archives.
        constraints: http(s) URLs of constraint files.
        cert: the host path of the CA bundle pip uses, if it exists.
    """

    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    trusted_hosts: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()
    constraints: tuple[str, ...] = ()
    cert: Path | None = None


def read_pip_settings() -> PipSettings:
    """Reads the host's pip settings (`pip config list` of this interpreter, plus the environment)."""
    return pip_settings_from(parse_pip_config_list(_pip_config_list()), os.environ)


def _pip_config_list() -> str:
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        logger.debug("pip config list failed, using the environment only: %s", exc)
        return ""
    if result.returncode != 0:
        # E.g. a uv-made environment without pip: the environment variables still apply.
        logger.debug("pip config list exited %s: %s", result.returncode, result.stderr.strip())
        return ""
    return result.stdout


def parse_pip_config_list(output: str) -> dict[str, dict[str, str]]:
    """Parses `pip config list` output into `{section: {key: value}}`."""
    config: dict[str, dict[str, str]] = {}
    for line in output.splitlines():
        match = _CONFIG_LINE.match(line.strip())
        if match is not None:
            config.setdefault(match["section"], {})[match["key"]] = match["value"]
    return config


def pip_settings_from(config: Mapping[str, Mapping[str, str]], env: Mapping[str, str]) -> PipSettings:
    """Combines parsed `pip config list` output and environment variables into `PipSettings`."""

    def lookup(key: str) -> str | None:
        env_value = env.get("PIP_" + key.upper().replace("-", "_"))
        if env_value:
            return env_value
        for section in _SECTIONS:
            value = config.get(section, {}).get(key)
            if value:
                return value
        return None

    index_urls = _remote_urls("index-url", lookup("index-url"))
    return PipSettings(
        index_url=index_urls[0] if index_urls else None,
        extra_index_urls=_remote_urls("extra-index-url", lookup("extra-index-url")),
        trusted_hosts=tuple((lookup("trusted-host") or "").split()),
        find_links=_remote_urls("find-links", lookup("find-links")),
        constraints=_remote_urls("constraint", lookup("constraint")),
        cert=_existing_file(lookup("cert") or env.get("REQUESTS_CA_BUNDLE") or env.get("SSL_CERT_FILE")),
    )


def _remote_urls(key: str, value: str | None) -> tuple[str, ...]:
    kept = []
    for item in (value or "").split():
        if item.startswith(("http://", "https://")):
            kept.append(item)
        else:
            logger.debug("pip %s %s is a host path, it does not exist inside the build: dropped", key, item)
    return tuple(kept)


def _existing_file(path: str | None) -> Path | None:
    if not path:
        return None
    candidate = Path(path)
    if not candidate.is_file():
        logger.debug("pip cert %s is not a file: not passed to the build", path)
        return None
    return candidate


def render_pip_conf(settings: PipSettings) -> str:
    """The image's `/etc/pip.conf`: the host's indexes, the system CA store and the kernel constraints."""
    lines = ["[global]"]
    if settings.index_url:
        lines.append(f"index-url = {settings.index_url}")
    for key, values in (
        ("extra-index-url", settings.extra_index_urls),
        ("trusted-host", settings.trusted_hosts),
        ("find-links", settings.find_links),
        ("constraint", (*settings.constraints, KERNEL_CONSTRAINTS_IN_IMAGE)),
    ):
        if values:
            lines.append(f"{key} = " + "\n    ".join(values))
    lines.append(f"cert = {CA_BUNDLE_IN_IMAGE}")
    return "\n".join(lines) + "\n"


def render_uv_toml(settings: PipSettings, constraints: Sequence[str]) -> str:
    """The image's `/etc/uv/uv.toml`: pip's settings in uv's terms, plus the kernel constraints.

    uv reads none of pip's files. Certificates come from the system store (`system-certs`), which holds the
    host's CA bundle. The host's constraint files (URLs) are pip's only: uv takes requirement strings.
    """
    lines = [
        "# ipybox: uv's settings in the image (build, cells, uvx servers). Written by `ipybox build`.",
        "system-certs = true",
        'link-mode = "copy"',
        'python-downloads = "never"',
        'python-preference = "only-system"',
        f"constraint-dependencies = {_toml_list(constraints)}",
    ]
    if settings.index_url:
        lines.append(f"index-url = {_toml_string(settings.index_url)}")
    if settings.extra_index_urls:
        lines.append(f"extra-index-url = {_toml_list(settings.extra_index_urls)}")
        # pip's behaviour: a package may come from any index (uv's default stops at the first that has it).
        lines.append('index-strategy = "unsafe-best-match"')
    if settings.trusted_hosts:
        lines.append(f"allow-insecure-host = {_toml_list(settings.trusted_hosts)}")
    if settings.find_links:
        lines.append(f"find-links = {_toml_list(settings.find_links)}")
    return "\n".join(lines) + "\n"


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a TOML basic string


def _toml_list(values: Sequence[str]) -> str:
    return "[" + ", ".join(_toml_string(value) for value in values) + "]"
