"""Where a sandbox's ports lead, for error messages: "on swarm node 'node2' (10.0.0.4)".

Filled by `ExecutionContainer` for sandboxes whose backend places them somewhere that is worth naming
(a swarm node), in this process; read by the clients when a connection fails, so the error says which
machine went away.
"""

from __future__ import annotations

from ipybox import _tokens

_places: dict[tuple[str, int], str] = {}


def note(host: str, port: int, place: str) -> None:
    _places[_tokens.key(host, port)] = place


def forget(host: str, port: int) -> None:
    _places.pop(_tokens.key(host, port), None)


def suffix(host: str, port: int) -> str:
    """` (on <place>)`, or "" when nothing is recorded for host:port."""
    place = _places.get(_tokens.key(host, port))
    return f" (on {place})" if place else ""
