"""The local engine finds a runtime's server once: no stat() per execution, and a server installed
after a miss is found on the next try."""

from __future__ import annotations

from pathlib import Path

from engine.local import LocalEngine
from engine.packages import FilesystemPackageStore
from router.config import Config


def test_a_found_server_is_remembered_and_a_missing_one_looked_for_again(tmp_path, monkeypatch):
    runtimes = tmp_path / "runtimes"
    (runtimes / "python3").mkdir(parents=True)
    monkeypatch.setenv("HEADWATER_RUNTIMES_DIR", str(runtimes))
    monkeypatch.setenv("HEADWATER_NODE", "/nonexistent/node")
    config = Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path / "data")}})
    engine = LocalEngine(config, FilesystemPackageStore(config))
    assert engine._server_command("python3") is None
    (runtimes / "python3" / "server.py").write_text("")
    command = engine._server_command("python3")
    assert command is not None and command[-1] == str(runtimes / "python3" / "server.py")
    looked: list[Path] = []
    real_is_file = Path.is_file
    monkeypatch.setattr(Path, "is_file", lambda self: looked.append(self) or real_is_file(self))
    assert engine._server_command("python3") == command and looked == []
