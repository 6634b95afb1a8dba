"""The documentation site under docs/ builds with warnings as errors and holds the operator pages."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = ("architecture.md", "install.md", "configuration.md", "upgrade.md", "ha.md", "monitoring.md", "operating.md")


def test_the_site_builds_strictly_with_every_operator_page(tmp_path):
    mkdocs = shutil.which("mkdocs") or str(Path(sys.executable).with_name("mkdocs"))
    result = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for page in PAGES:
        assert (tmp_path / "site" / page.removesuffix(".md") / "index.html").is_file(), page


def test_nothing_points_outside_the_repository():
    # ../shared/DESIGN.md was never in the repository: the architecture lives in docs/architecture.md.
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        assert "shared/DESIGN.md" not in path.read_text(), path
