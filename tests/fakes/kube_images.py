"""The images the fake cluster can pull, read from runtimes/*/Dockerfile so they cannot drift from what an operator builds."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RUNTIMES = REPO / "runtimes"
# runtimes/build.sh names every image <registry>/runtime-<folder>; "headwater" is the published registry.
RUNTIME_IMAGE_PREFIX = "headwater/runtime-"

# Programs a base image (or a package it installs) puts on PATH. The fake kubelet runs the host's
# program of that name: the language is the host's, everything else comes from the Dockerfile.
BASE_PROGRAMS = {"python": ("python", "python3"), "node": ("node",), "golang": ("go",)}
APT_PROGRAMS = {"php-cli": ("php",), "nodejs": ("node",), "golang-go": ("go",)}


@dataclasses.dataclass
class FakeImage:
    """What the fake kubelet knows of an image: its ENTRYPOINT/CMD, the files it contains (container
    path → host path), binaries mapped to host programs, its working directory, ENV and USER."""

    entrypoint: list[str] = dataclasses.field(default_factory=list)
    cmd: list[str] = dataclasses.field(default_factory=list)
    files: dict[str, str] = dataclasses.field(default_factory=dict)
    binaries: dict[str, str] = dataclasses.field(default_factory=dict)
    workdir: str = "/"
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    user: str = "0"  # an image without USER runs as root: runAsNonRoot pods refuse it


def _host_program(name: str) -> str | None:
    return sys.executable if name in ("python", "python3") else shutil.which(name)


def _programs(names) -> dict[str, str]:
    return {name: path for name in names if (path := _host_program(name)) is not None}


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: comments dropped, backslash continuations joined."""
    out, pending = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") and not pending:
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        whole = (pending + line).strip()
        pending = ""
        if whole and not whole.startswith("#"):
            word, _, rest = whole.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _exec_form(text: str) -> list[str]:
    return json.loads(text) if text.startswith("[") else ["/bin/sh", "-c", text]


def _base_programs(image: str) -> tuple[str, ...]:
    repo = image.split(":", 1)[0].rsplit("/", 1)[-1]
    return BASE_PROGRAMS.get(repo, ())


def parse_dockerfile(path: Path, context: Path) -> FakeImage:
    """The final stage of a Dockerfile as the fake kubelet runs it: COPY sources are the build context's
    files (a COPY --from another stage brings that stage's programs), RUN apt-get install adds programs."""
    stages: dict[str, tuple[str, ...]] = {}
    image = FakeImage()
    programs: set[str] = set()
    for word, rest in _instructions(path.read_text()):
        if word == "FROM":
            parts = rest.split()
            base = parts[0]
            programs = set(_base_programs(base))
            if len(parts) == 3 and parts[1].upper() == "AS":
                stages[parts[2]] = tuple(programs)
            image = FakeImage()  # a new stage starts from its base image
        elif word == "COPY":
            args = shlex.split(rest)
            source_stage = next((a.split("=", 1)[1] for a in args if a.startswith("--from=")), None)
            args = [a for a in args if not a.startswith("--")]
            if source_stage is not None:
                programs |= set(stages.get(source_stage, ()))
                continue
            *sources, dest = args
            for source in sources:
                host = context / source.rstrip("/")
                if not host.exists():
                    raise FileNotFoundError(f"{path}: COPY {source}: no such file in the build context {context}")
                target = dest.rstrip("/") + "/" + host.name if dest.endswith("/") and not source.endswith("/") else dest.rstrip("/")
                image.files[target] = str(host)
        elif word == "RUN":
            for package, names in APT_PROGRAMS.items():
                if re.search(rf"apt-get install\b[^&;|]*\s{re.escape(package)}(\s|$)", rest):
                    programs |= set(names)
        elif word == "WORKDIR":
            image.workdir = rest
        elif word == "USER":
            image.user = rest
        elif word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                image.env[key] = value
        elif word == "ENTRYPOINT":
            image.entrypoint = _exec_form(rest)
        elif word == "CMD":
            image.cmd = _exec_form(rest)
    image.binaries = _programs(sorted(programs))
    # PATH of the image points into the image; the fake runs host programs, so it keeps the host's.
    image.env.pop("PATH", None)
    return image


def runtime_images() -> dict[str, FakeImage]:
    """Every published runtime image (headwater/runtime-<name>), from its Dockerfile."""
    return {RUNTIME_IMAGE_PREFIX + dockerfile.parent.name: parse_dockerfile(dockerfile, RUNTIMES)
            for dockerfile in sorted(RUNTIMES.glob("*/Dockerfile"))}


def default_images() -> dict[str, FakeImage]:
    """What the fake cluster can pull: the published runtime images, and nothing else (as a cluster
    whose registry holds only Headwater's images). Tests add their own image functions' images."""
    return runtime_images()
