"""The host's pip settings, passed into the image build.

Where the host reaches PyPI through a mirror or a TLS-intercepting proxy, pip inside the build needs the
same index URLs and CA bundle. We read them from `pip config list` and the `PIP_*` environment, keep what
is meaningful inside a container (http(s) URLs, the CA bundle's content) and drop host paths such as
`file://` indexes or local find-links, which do not exist inside the build.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CA_PATH_IN_IMAGE = "/etc/ipybox/pip/ca.pem"
"""Where the Dockerfile copies the host's CA bundle (`pip/ca.pem` in the context)."""

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
    """The `pip.conf` for the image; its `cert` points at `CA_PATH_IN_IMAGE` when a CA bundle exists."""
    lines = ["[global]"]
    if settings.index_url:
        lines.append(f"index-url = {settings.index_url}")
    for key, values in (
        ("extra-index-url", settings.extra_index_urls),
        ("trusted-host", settings.trusted_hosts),
        ("find-links", settings.find_links),
        ("constraint", settings.constraints),
    ):
        if values:
            lines.append(f"{key} = " + "\n    ".join(values))
    if settings.cert is not None:
        lines.append(f"cert = {CA_PATH_IN_IMAGE}")
    return "\n".join(lines) + "\n"
