"""Swift objects as function code: HEAD to validate an object when a function is created, GET to
fetch it when the function runs (Qinling's `code.source = swift`, done for real)."""

from __future__ import annotations

import logging
from urllib.parse import quote

import aiohttp

from router.plugins import PackageInvalid

LOG = logging.getLogger(__name__)

MAX_OBJECT_SIZE = 51 * 1024 * 1024  # Qinling's MAX_PACKAGE_SIZE for Swift objects
_TIMEOUT = aiohttp.ClientTimeout(total=60)


class SwiftObjects:
    """A storage URL template (`http://swift:8080/v1/AUTH_{project_id}`) and an optional token."""

    def __init__(self, url_template: str, token: str | None = None):
        self.url_template = url_template.rstrip("/")
        self.token = token

    def _url(self, project_id: str, container: str, obj: str) -> str:
        base = self.url_template.replace("{project_id}", quote(project_id, safe=""))
        return f"{base}/{quote(container, safe='')}/{quote(obj, safe='/')}"

    def _headers(self) -> dict[str, str]:
        return {"X-Auth-Token": self.token} if self.token else {}

    async def head(self, project_id: str, container: str, obj: str) -> dict[str, str]:
        """The object's headers; PackageInvalid when it is missing, unreadable or too large."""
        url = self._url(project_id, container, obj)
        try:
            async with aiohttp.ClientSession(timeout=_TIMEOUT) as session:
                async with session.head(url, headers=self._headers()) as resp:
                    if resp.status != 200:
                        raise PackageInvalid(f"Failed to validate object in Swift: {container}/{obj} answered {resp.status}.")
                    size = int(resp.headers.get("Content-Length", "0"))
                    if size > MAX_OBJECT_SIZE:
                        raise PackageInvalid(f"Failed to validate object in Swift: {container}/{obj} is larger than 51 MiB.")
                    return dict(resp.headers)
        except aiohttp.ClientError as exc:
            raise PackageInvalid(f"Failed to validate object in Swift: {exc}") from None

    async def get(self, project_id: str, container: str, obj: str) -> tuple[bytes, str]:
        """The object's bytes and its ETag."""
        url = self._url(project_id, container, obj)
        async with aiohttp.ClientSession(timeout=_TIMEOUT) as session:
            async with session.get(url, headers=self._headers()) as resp:
                if resp.status != 200:
                    raise FileNotFoundError(f"Swift object {container}/{obj} answered {resp.status}")
                data = await resp.content.read(MAX_OBJECT_SIZE + 1)
                if len(data) > MAX_OBJECT_SIZE:
                    raise PackageInvalid(f"Swift object {container}/{obj} is larger than 51 MiB")
                return data, resp.headers.get("ETag", "").strip('"')
