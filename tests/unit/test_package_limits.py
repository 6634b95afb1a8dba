"""Package limits (finding 3): a zip bomb is refused at upload with a 400 naming the limit, before
anything is unpacked, and a deleted function's unpacked code does not stay on disk."""

from __future__ import annotations

import json
import zipfile

from aiohttp import FormData

from tests.e2e.server import make_zip

PAD = b"\0" * (4 * 1024 * 1024)


def zip_bytes(files: dict[str, bytes | str]) -> bytes:
    return make_zip(files, zipfile.ZIP_DEFLATED)


async def create(hw, package: bytes):
    runtime = await (await hw.client.post("/v1/runtimes", json={"image": "python3"})).json()
    form = FormData()
    form.add_field("runtime_id", runtime["id"])
    form.add_field("code", json.dumps({"source": "package"}))
    form.add_field("entry", "main.main")
    form.add_field("package", package, filename="f.zip")
    return await hw.client.post("/v1/functions", data=form)


async def test_a_zip_bomb_is_refused_at_upload(make_headwater):
    hw = await make_headwater("null", resource_limits={"max_package_unpacked_size": str(1024 * 1024)})
    bomb = zip_bytes({"main.py": "def main(): pass\n", "pad.bin": PAD})
    assert len(bomb) < 64 * 1024  # small on the wire, 4 MiB unpacked
    resp = await create(hw, bomb)
    assert resp.status == 400
    text = await resp.text()
    assert "max_package_unpacked_size" in text and "1048576" in text
    assert str(hw.config.data_dir) not in text
    assert not list((hw.config.data_dir / "packages").rglob("*.zip")), "nothing was stored"


async def test_too_many_files_are_refused_at_upload(make_headwater):
    hw = await make_headwater("null", resource_limits={"max_package_files": "5"})
    resp = await create(hw, zip_bytes({f"m{i}.py": "" for i in range(6)}))
    assert resp.status == 400 and "max_package_files" in await resp.text()


async def test_unpacked_trees_go_with_their_function(make_headwater):
    hw = await make_headwater("local")
    resp = await create(hw, zip_bytes({"main.py": "def main():\n    return 'ok'\n"}))
    assert resp.status == 201, await resp.text()
    fid = (await resp.json())["id"]
    resp = await hw.client.post("/v1/executions", json={"function_id": fid, "sync": True})
    assert (await resp.json())["status"] == "success", await resp.text()
    trees = list((hw.config.data_dir / "runtimes").glob(f"*/packages/{fid}_*"))
    assert trees, "the execution unpacked the package"
    assert (await hw.client.delete(f"/v1/functions/{fid}")).status == 204
    assert not any(tree.exists() for tree in trees), "the deleted function's code stayed on disk"
