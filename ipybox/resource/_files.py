"""File and directory transfers of ResourceClient (placeholder until implemented)."""

from __future__ import annotations

from pathlib import Path

import aiohttp


async def upload_file(session: aiohttp.ClientSession, relpath: str, local_path: Path) -> None:
    raise NotImplementedError


async def download_file(session: aiohttp.ClientSession, relpath: str, local_path: Path) -> None:
    raise NotImplementedError


async def delete_file(session: aiohttp.ClientSession, relpath: str) -> None:
    raise NotImplementedError


async def upload_directory(session: aiohttp.ClientSession, relpath: str, local_path: Path) -> None:
    raise NotImplementedError


async def download_directory(session: aiohttp.ClientSession, relpath: str, local_path: Path) -> None:
    raise NotImplementedError
