"""The README's Quickstart, run verbatim (its sh block, as a newcomer would paste it) against a
real `headwater serve` on a free port."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.e2e.server import Server
from tests.services import require_program

README = Path(__file__).resolve().parents[2] / "README.md"


def quickstart() -> str:
    text = README.read_text()
    section = text.split("\n## Quickstart", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```sh\n(.*?)```", section, re.S)
    return block


def test_the_quickstart_block_is_self_contained():
    block = quickstart()
    assert "<" + "execution id>" not in block and "localhost:7070/v1" not in block, "ids and URLs come from variables"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with Server(tmp_path_factory.mktemp("readme")) as srv:
        yield srv


def test_the_quickstart_runs_without_an_error(server, tmp_path):
    require_program("curl", "apt-get install curl")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", quickstart()], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path, env={**os.environ, "HEADWATER_URL": server.url, "TMPDIR": str(tmp_path)})
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    out = result.stdout
    assert 'Hello, Qinling' in out.splitlines()[0], out  # the sync execution's result
    assert '"execution_id"' in out  # the webhook's reply
    assert "saying hello to Qinling" in out.rsplit("}", 1)[-1], out  # the log, printed last
    assert out.endswith("\n")
