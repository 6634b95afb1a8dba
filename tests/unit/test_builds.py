"""The build step's bookkeeping (router/builds.py): which runtimes build, where artifacts are, and a
build left `building` by a stopped service resumes when the service starts again."""

from __future__ import annotations

import asyncio
import io
import zipfile

from router import builds
from router.app import Headwater
from router.config import Config
from router.plugins import PackageRef
from router.store import models
from tests.services import require_program


def test_which_images_build(tmp_path):
    config = Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}})
    assert builds.runtime_name(config, "headwater/go-runtime:1") == "go"
    assert builds.needs_build(config, "headwater/go-runtime:1")
    assert not builds.needs_build(config, "openstackqinling/python3-runtime:0.0.2")
    assert not builds.needs_build(config, "headwater/php-runtime")
    assert not builds.needs_build(config, None)
    config = Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}, "engine": {"compiled_runtimes": ""}})
    assert not builds.needs_build(config, "headwater/go-runtime:1")


def test_artifacts_of_the_function_and_its_versions():
    row = models.Function(id="f", project_id="p", code={"source": "package", "md5sum": "src"})
    assert builds.status(row.code) == "available" and builds.artifact_ref(row, 0) is None
    row.code = {**row.code, "build": {"status": "building"}}
    assert builds.status(row.code) == "building" and builds.artifact_ref(row, 0) is None
    row.code = {**row.code, "build": {"status": "available", "md5sum": "art"}}
    assert builds.artifact_ref(row, 0) == PackageRef("p", "f", 0, "art")
    row.code = builds.with_version(row.code, 2, "art")
    assert builds.artifact_ref(row, 2) == PackageRef("p", "f", 2, "art")
    assert builds.rebuilding(row.code) == {"status": "building", "versions": {"2": "art"}}
    row.code = builds.with_version(row.code, 2, None)
    assert builds.artifact_ref(row, 2) is None
    failed = {"source": "package", "build": {"status": "error", "message": "./x.go:1: boom"}}
    result = builds.build_failure(failed)
    assert (result.status, result.reason, result.output) == ("failed", "build_failed", "./x.go:1: boom")
    assert builds.build_failure(row.code) is None


async def test_a_build_left_building_resumes_when_the_service_starts(tmp_path):
    require_program("go", "the go runtime builds with it")
    app = Headwater(Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}}))
    await app.start()
    try:
        runtime = await app.store.runtimes.add(image="headwater/go-runtime", status="available", project_id="p")
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("handler.go", "package handler\n\nfunc Hello() string { return \"resumed\" }\n")
        md5 = await app.packages.put("p", "fn-resumed", 0, buf.getvalue())
        # What a service stopped mid-build leaves behind: the function, `building`, no build running.
        await app.store.functions.add(id="fn-resumed", project_id="p", runtime_id=runtime.id, entry="handler.Hello",
                                      memory_size=33554432, cpu=100, timeout=5,
                                      code={"source": "package", "md5sum": md5, "build": {"status": "building"}})
        await app.builds.resume()
        for _ in range(1200):
            row = await app.store.functions.get("fn-resumed")
            if builds.status(row.code) != "building":
                break
            await asyncio.sleep(0.2)
        assert builds.status(row.code) == "available", row.code
        assert app.packages.path(builds.artifact_ref(row, 0)) is not None  # stored beside the package
    finally:
        await app.stop()
