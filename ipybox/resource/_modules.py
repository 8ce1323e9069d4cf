"""Module source requests of ResourceClient."""

from __future__ import annotations

from ipybox.resource._http import Link, raise_for_response, transfer


async def get_module_sources(link: Link, module_names: list[str]) -> dict[str, str]:
    if isinstance(module_names, str):
        raise TypeError("module_names must be a list of names, not one string")
    action = f"getting the sources of {', '.join(module_names)}"
    async with transfer(link, action):
        async with link.session.get("/modules", params=[("name", name) for name in module_names]) as response:
            await raise_for_response(response, action)
            sources: dict[str, str] = await response.json()
            return sources
