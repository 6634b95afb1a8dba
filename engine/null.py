"""NullEngine: answers every execution at once with its input as output (benchmarks, router tests)."""

from __future__ import annotations

from typing import ClassVar

from router.config import Config
from router.plugins import Coordination, ExecutionRequest, ExecutionResult, PackageStore


class NullEngine:
    name: ClassVar[str] = "null"

    def __init__(self, config: Config, packages: PackageStore, *, coordinator: Coordination | None = None) -> None:
        self.config = config
        self.packages = packages

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def execute(self, request: ExecutionRequest) -> ExecutionResult:
        # Never suspends, so there is nothing to stop when a caller cancels it.
        return ExecutionResult(status="success", output=request.input, duration=0.0, logs="", reason="ok")

    async def release(self, function_id: str, version: int | None = None) -> None:
        pass

    async def workers(self, function_id: str, version: int = 0) -> list[str]:
        return []
