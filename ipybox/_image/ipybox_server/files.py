"""File and directory endpoints of the resource server (placeholder until implemented)."""

from aiohttp import web


def add_routes(app: web.Application) -> None:
    pass
