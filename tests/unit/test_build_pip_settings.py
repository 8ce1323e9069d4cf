"""The host's pip settings: what is carried into the build and what is dropped."""

from __future__ import annotations

import tomllib
from pathlib import Path

from ipybox._build.pip_settings import (
    CA_BUNDLE_IN_IMAGE,
    KERNEL_CONSTRAINTS_IN_IMAGE,
    PipSettings,
    parse_pip_config_list,
    pip_settings_from,
    render_pip_conf,
    render_uv_toml,
)

# What `pip config list` prints on the development machine.
HOST_OUTPUT = """\
:env:.cert='/etc/ssl/certs/ca-certificates.crt'
:env:.default-timeout='180'
:env:.find-links='/opt/wheels'
global.cert='/etc/ssl/certs/ca-certificates.crt'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'
global.find-links='/opt/wheels'
"""


def test_parse_pip_config_list() -> None:
    config = parse_pip_config_list(HOST_OUTPUT)
    assert config[":env:"]["cert"] == "/etc/ssl/certs/ca-certificates.crt"
    assert config["global"]["extra-index-url"] == "file:///opt/pypi/simple file:///opt/pypi-more/simple"
    assert parse_pip_config_list("garbage\n\n") == {}


def test_host_paths_are_dropped_and_the_cert_is_kept(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("PEM")
    output = HOST_OUTPUT.replace("/etc/ssl/certs/ca-certificates.crt", str(ca))
    settings = pip_settings_from(parse_pip_config_list(output), env={})
    assert settings == PipSettings(cert=ca)


def test_http_urls_are_kept_and_env_wins_over_config(tmp_path: Path) -> None:
    output = """\
global.index-url='https://mirror.example/simple'
install.index-url='https://install.example/simple'
global.extra-index-url='https://extra.example/simple file:///opt/local'
global.trusted-host='mirror.example extra.example'
global.find-links='https://wheels.example/ /opt/wheels'
"""
    settings = pip_settings_from(parse_pip_config_list(output), env={})
    assert settings.index_url == "https://install.example/simple"
    assert settings.extra_index_urls == ("https://extra.example/simple",)
    assert settings.trusted_hosts == ("mirror.example", "extra.example")
    assert settings.find_links == ("https://wheels.example/",)

    env = {"PIP_INDEX_URL": "http://env.example/simple", "PIP_EXTRA_INDEX_URL": "file:///x"}
    settings = pip_settings_from(parse_pip_config_list(output), env=env)
    assert settings.index_url == "http://env.example/simple"
    assert settings.extra_index_urls == ()


def test_cert_falls_back_to_requests_ca_bundle_then_ssl_cert_file(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_text("PEM")
    assert pip_settings_from({}, env={"REQUESTS_CA_BUNDLE": str(bundle)}).cert == bundle
    assert pip_settings_from({}, env={"SSL_CERT_FILE": str(bundle)}).cert == bundle
    assert pip_settings_from({}, env={"PIP_CERT": str(tmp_path / "missing.pem")}).cert is None


def test_render_pip_conf() -> None:
    settings = PipSettings(
        index_url="https://mirror.example/simple",
        extra_index_urls=("https://a.example/simple", "https://b.example/simple"),
        trusted_hosts=("mirror.example",),
        constraints=("https://c.example/constraints.txt",),
        cert=Path("/host/ca.pem"),
    )
    assert render_pip_conf(settings) == (
        "[global]\n"
        "index-url = https://mirror.example/simple\n"
        "extra-index-url = https://a.example/simple\n    https://b.example/simple\n"
        "trusted-host = mirror.example\n"
        f"constraint = https://c.example/constraints.txt\n    {KERNEL_CONSTRAINTS_IN_IMAGE}\n"
        f"cert = {CA_BUNDLE_IN_IMAGE}\n"
    )


def test_render_pip_conf_always_has_the_system_store_and_the_kernel_constraints() -> None:
    # The host's CA certificates are added to the system store; without any, the store is still the right one.
    assert render_pip_conf(PipSettings()) == (
        f"[global]\nconstraint = {KERNEL_CONSTRAINTS_IN_IMAGE}\ncert = {CA_BUNDLE_IN_IMAGE}\n"
    )


def test_render_uv_toml() -> None:
    settings = PipSettings(
        index_url="https://mirror.example/simple",
        extra_index_urls=("https://a.example/simple",),
        trusted_hosts=("mirror.example", "a.example"),
        find_links=("https://f.example/links",),
        constraints=("https://c.example/constraints.txt",),  # pip's only: uv takes requirement strings
    )
    text = render_uv_toml(settings, ["ipykernel>=6.29,<8", 'tornado>=6.2; python_version >= "3"'])
    parsed = tomllib.loads(text)
    assert parsed == {
        "system-certs": True,
        "link-mode": "copy",
        "python-downloads": "never",
        "python-preference": "only-system",
        "constraint-dependencies": ["ipykernel>=6.29,<8", 'tornado>=6.2; python_version >= "3"'],
        "index-url": "https://mirror.example/simple",
        "extra-index-url": ["https://a.example/simple"],
        "index-strategy": "unsafe-best-match",
        "allow-insecure-host": ["mirror.example", "a.example"],
        "find-links": ["https://f.example/links"],
    }
    assert "c.example" not in text


def test_render_uv_toml_without_host_settings() -> None:
    parsed = tomllib.loads(render_uv_toml(PipSettings(), []))
    assert parsed["constraint-dependencies"] == []
    assert not {"index-url", "extra-index-url", "index-strategy", "allow-insecure-host", "find-links"} & set(parsed)
