"""Where a sandbox's ports lead, as lost-connection errors name it."""

from __future__ import annotations

from ipybox import _where


def test_a_noted_place_is_named_for_both_loopback_spellings_and_forgotten() -> None:
    _where.note("10.0.0.4", 32768, "swarm node 'node2' (10.0.0.4)")
    try:
        assert _where.suffix("10.0.0.4", 32768) == " (on swarm node 'node2' (10.0.0.4))"
        assert _where.suffix("10.0.0.4", 32769) == ""
    finally:
        _where.forget("10.0.0.4", 32768)
    assert _where.suffix("10.0.0.4", 32768) == ""
    _where.note("localhost", 40000, "somewhere")
    try:
        assert _where.suffix("127.0.0.1", 40000) == " (on somewhere)"  # loopback names are one key
    finally:
        _where.forget("127.0.0.1", 40000)
    assert _where.suffix("localhost", 40000) == ""
