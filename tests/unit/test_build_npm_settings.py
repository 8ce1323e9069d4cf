"""The host's npm registry: what is carried into the image's npmrc."""

from __future__ import annotations

import pytest

from ipybox._build import npm_settings
from ipybox._build.npm_settings import PUBLIC_NPM_REGISTRY, npm_registry_from, read_npm_registry, render_npmrc


@pytest.mark.parametrize(
    ("output", "registry"),
    [
        ("https://npm.mirror.example/api/npm/\n", "https://npm.mirror.example/api/npm/"),
        ("http://10.0.0.5:4873", "http://10.0.0.5:4873/"),
        ("", PUBLIC_NPM_REGISTRY),
        ("undefined\n", PUBLIC_NPM_REGISTRY),
        ("file:///srv/npm", PUBLIC_NPM_REGISTRY),
        ("https://a.example/ https://b.example/", PUBLIC_NPM_REGISTRY),
    ],
)
def test_npm_registry_from(output: str, registry: str) -> None:
    assert npm_registry_from(output) == registry


def test_no_npm_on_the_host_gives_the_public_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(npm_settings.shutil, "which", lambda name: None)
    assert read_npm_registry() == PUBLIC_NPM_REGISTRY


def test_render_npmrc() -> None:
    lines = render_npmrc("https://npm.example/").splitlines()
    assert "registry=https://npm.example/" in lines
    assert "cafile=/etc/ssl/certs/ca-certificates.crt" in lines
    assert {"update-notifier=false", "fund=false", "audit=false"} <= set(lines)
    assert "prefix=/opt/ipybox/npm-global" in lines  # npm install -g as the sandbox user


def test_npm_settings_from_reads_the_registry_and_an_existing_cafile(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ipybox._build.npm_settings import npm_settings_from

    ca = tmp_path / "npm-ca.pem"
    ca.write_text("PEM")
    assert npm_settings_from(f"registry=https://npm.example/\ncafile={ca}\n") == ("https://npm.example/", ca)
    assert npm_settings_from(f"registry=https://npm.example/\ncafile={tmp_path}/missing.pem\n")[1] is None
    assert npm_settings_from("registry=https://npm.example/\ncafile=null\n")[1] is None
    assert npm_settings_from("") == (PUBLIC_NPM_REGISTRY, None)
