"""The host's pip settings: what is carried into the build and what is dropped."""

from __future__ import annotations

from pathlib import Path

from ipybox._build.pip_settings import (
    CA_PATH_IN_IMAGE,
    PipSettings,
    parse_pip_config_list,
    pip_settings_from,
    render_pip_conf,
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
        cert=Path("/host/ca.pem"),
    )
    assert render_pip_conf(settings) == (
        "[global]\n"
        "index-url = https://mirror.example/simple\n"
        "extra-index-url = https://a.example/simple\n    https://b.example/simple\n"
        "trusted-host = mirror.example\n"
        f"cert = {CA_PATH_IN_IMAGE}\n"
    )
    assert render_pip_conf(PipSettings()) == "[global]\n"
