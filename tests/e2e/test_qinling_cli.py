"""The real `openstack function …` CLI (python-openstackclient + python-qinlingclient from PyPI) against
a real `headwater serve`, through every command an operator of Qinling used."""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
import venv
from pathlib import Path

import pytest

from tests.e2e.server import Server, make_zip
from tests.services import REQUIRE

# Reused between runs: installing the CLI takes ~40 s, so it is done once per machine.
OSC_VENV = Path(os.environ.get("HEADWATER_OSC_VENV", "/var/tmp/headwater-osc"))
OSC_PACKAGES = ("python-openstackclient", "python-qinlingclient")

HELLO = '''
def main(name="World", **kwargs):
    print("Hello from the CLI test, name=%s" % name)
    return "Hello, %s" % name
'''
HELLO_V2 = HELLO.replace("Hello, %s", "Hi, %s")

# Runs inside the CLI's virtualenv: takes one argv (JSON) per line, runs it through OSC's own
# entry point (openstackclient.shell.main, what the `openstack` script calls) and answers with the
# exit code and output. Start-up of the CLI (~1 s of imports) is paid once, not once per command.
DRIVER = r'''
import contextlib, io, json, sys
from openstackclient import shell
for line in sys.stdin:
    argv = json.loads(line)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = shell.main(argv)
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
    sys.__stdout__.write(json.dumps({"rc": rc, "out": out.getvalue(), "err": err.getvalue()}) + "\n")
    sys.__stdout__.flush()
'''


def _unavailable(reason: str):
    if REQUIRE:
        pytest.fail(f"{reason} and HEADWATER_REQUIRE_SERVICES=1 forbids skipping", pytrace=False)
    pytest.skip(reason)


def osc_python() -> Path:
    """The CLI's interpreter, installing the CLI from PyPI into the cached venv on first use."""
    python = OSC_VENV / "bin" / "python"
    marker = OSC_VENV / ".headwater-installed"
    OSC_VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{OSC_VENV}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs at once must not install into one venv
        if marker.exists() and python.exists():
            return python
        venv.EnvBuilder(with_pip=True, clear=True).create(OSC_VENV)
        started = time.monotonic()
        proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *OSC_PACKAGES],
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            _unavailable(f"could not install {' '.join(OSC_PACKAGES)} from PyPI: {proc.stderr.strip()[-500:]}")
        marker.write_text(f"installed in {time.monotonic() - started:.0f}s\n")
    return python


class Cli:
    """`openstack --os-auth-type none --os-endpoint <server> …`, run through one long-lived driver."""

    def __init__(self, python: Path, endpoint: str, workdir: Path):
        self.base = ["--os-auth-type", "none", "--os-endpoint", endpoint]
        self.python = python
        self.workdir = workdir
        self.commands = 0
        env = {**os.environ, "OS_CLOUD": "", "PYTHONUNBUFFERED": "1"}
        for key in [k for k in env if k.startswith("OS_") and k != "OS_CLOUD"]:
            del env[key]  # an operator's OS_* variables must not leak into the test
        self.env = env
        self.proc = subprocess.Popen([str(python), "-c", DRIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=workdir, env=env)

    def __call__(self, *args: str, ok: bool = True) -> dict:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps([*self.base, *args]) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"CLI driver died running {args}"
        reply = json.loads(line)
        self.commands += 1
        if ok:
            assert reply["rc"] == 0, f"openstack {' '.join(args)} exited {reply['rc']}:\n{reply['err']}{reply['out']}"
        return reply

    def json(self, *args: str):
        return json.loads(self(*args, "-f", "json")["out"])

    def run_binary(self, *args: str) -> subprocess.CompletedProcess:
        """The installed `openstack` executable itself, as an operator runs it."""
        self.commands += 1
        return subprocess.run([str(self.python.parent / "openstack"), *self.base, *args], capture_output=True,
                              text=True, cwd=self.workdir, env=self.env, timeout=120)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    python = osc_python()
    workdir = tmp_path_factory.mktemp("cli-work")
    with Server(tmp_path_factory.mktemp("headwater-cli")) as server:
        client = Cli(python, server.url, workdir)
        client.server = server
        yield client
        client.close()


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(interval)


def test_openstack_function_cli_end_to_end(cli):
    if shutil.which("curl") is None:
        _unavailable("curl is not installed (the test POSTs to a webhook_url with it)")
    started = time.monotonic()
    server = cli.server
    work = cli.workdir

    # -- runtimes: the real executable first, to prove the installed entry point works as such --
    created = cli.run_binary("runtime", "create", "openstackqinling/python3-runtime:0.0.2", "--name", "python3",
                             "-f", "json")
    assert created.returncode == 0, created.stderr
    runtime = json.loads(created.stdout)
    assert runtime["name"] == "python3" and runtime["status"] == "available" and runtime["is_public"] is True
    runtime_id = runtime["id"]
    assert runtime_id in [r["Id"] for r in cli.json("runtime", "list")]
    assert cli.json("runtime", "show", runtime_id)["image"] == "openstackqinling/python3-runtime:0.0.2"
    spare = cli.json("runtime", "create", "openstackqinling/python3-runtime:0.0.3", "--private", "--untrusted")
    assert spare["is_public"] is False and spare["trusted"] is False

    # -- functions: --file (zipped by the client) and --package ---------------------------------
    source = work / "hello.py"
    source.write_text(HELLO)
    fn = cli.json("function", "create", "--runtime", runtime_id, "--name", "hello", "--file", str(source),
                  "--entry", "hello.main", "--timeout", "10")
    function_id = fn["id"]
    code = fn["code"] if isinstance(fn["code"], dict) else json.loads(fn["code"].replace("'", '"'))
    assert code["source"] == "package" and len(code["md5sum"]) == 32
    assert fn["timeout"] == 10 and fn["cpu"] == 100 and fn["memory_size"] == 33554432 and fn["entry"] == "hello.main"
    package = work / "pkg.zip"
    package.write_bytes(make_zip({"pkg.py": HELLO}))
    fn2 = cli.json("function", "create", "--runtime", "python3", "--name", "from-package", "--package", str(package),
                   "--entry", "pkg.main", "--cpu", "200", "--memory-size", "67108864")
    assert fn2["cpu"] == 200 and fn2["memory_size"] == 67108864 and fn2["runtime_id"] == runtime_id
    assert cli.json("function", "show", "hello")["id"] == function_id  # by name: the client lists and finds
    names = {f["Name"] for f in cli.json("function", "list")}
    assert {"hello", "from-package"} <= names
    updated = cli.json("function", "update", function_id, "--description", "greets", "--timeout", "20")
    assert updated["description"] == "greets" and updated["timeout"] == 20
    download = work / "download.zip"
    cli("function", "download", function_id, "-o", str(download))
    assert download.read_bytes()[:2] == b"PK"

    # -- executions: sync by default, --async, --input ------------------------------------------
    sync = cli.json("function", "execution", "create", "--function", function_id, "--input", '{"name": "Qinling"}')
    assert sync["status"] == "success", sync
    assert json.loads(sync["result"])["output"] == "Hello, Qinling" and sync["sync"] is True
    plain = cli.json("function", "execution", "create", "--function", "hello", "--input", "operator")
    assert json.loads(plain["result"])["output"] == "Hello, operator" and plain["input"] == "operator"
    pending = cli.json("function", "execution", "create", "--function", function_id, "--async", "--input",
                       '{"name": "async"}')
    assert pending["sync"] is False and pending["status"] in ("running", "success")
    finished = wait_for(lambda: (e := cli.json("function", "execution", "show", pending["id"]))["status"] != "running" and e)
    assert finished["status"] == "success" and json.loads(finished["result"])["output"] == "Hello, async"
    log_text = cli("function", "execution", "log", "show", pending["id"])["out"]
    assert "Hello from the CLI test, name=async" in log_text
    listed = cli.json("function", "execution", "list", "--filter", f"function_id={function_id}")
    assert {sync["id"], plain["id"], pending["id"]} <= {e["Id"] for e in listed}
    assert [e["Id"] for e in cli.json("function", "execution", "list", "--filter", "status=failed")] == []
    cli("function", "execution", "delete", "--execution", plain["id"])
    assert plain["id"] not in {e["Id"] for e in cli.json("function", "execution", "list")}

    # -- versions and aliases ---------------------------------------------------------------------
    v1 = cli.json("function", "version", "create", function_id, "--description", "first")
    assert v1["version_number"] == 1 and v1["description"] == "first"
    source.write_text(HELLO_V2)
    cli.json("function", "update", function_id, "--file", str(source))
    v2 = cli.json("function", "version", "create", function_id)
    assert v2["version_number"] == 2
    assert [v["Version_number"] for v in cli.json("function", "version", "list", function_id)] == [1, 2]
    assert cli.json("function", "version", "show", function_id, "1")["description"] == "first"
    by_version = cli.json("function", "execution", "create", "--function", function_id, "--function-version", "1",
                          "--input", "v1")
    assert json.loads(by_version["result"])["output"] == "Hello, v1" and by_version["function_version"] == 1

    alias = cli.json("function", "alias", "create", "live", "--function", function_id, "--function-version", "1",
                     "--description", "production")
    assert alias["function_version"] == 1 and alias["function_id"] == function_id
    assert "live" in [a["Name"] for a in cli.json("function", "alias", "list")]
    assert cli.json("function", "alias", "show", "live")["description"] == "production"
    via_alias = cli.json("function", "execution", "create", "--function-alias", "live", "--input", "alias")
    assert json.loads(via_alias["result"])["output"] == "Hello, alias"
    repointed = cli.json("function", "alias", "update", "live", "--function-version", "2")
    assert repointed["function_version"] == 2
    # Resolved at use time: the same alias now runs version 2's code.
    via_alias = cli.json("function", "execution", "create", "--function-alias", "live", "--input", "alias")
    assert json.loads(via_alias["result"])["output"] == "Hi, alias"

    # -- webhooks, and a curl POST to the webhook_url -------------------------------------------
    hook = cli.json("webhook", "create", "--function", function_id, "--description", "cli hook")
    assert hook["webhook_url"] == f"{server.url}/v1/webhooks/{hook['id']}/invoke"
    assert hook["id"] in {w["Id"] for w in cli.json("webhook", "list")}
    assert cli.json("webhook", "show", hook["id"])["description"] == "cli hook"
    moved = cli.json("webhook", "update", hook["id"], "--function-version", "2", "--description", "on v2")
    assert moved["function_version"] == 2 and moved["description"] == "on v2"
    curl = subprocess.run(["curl", "-sS", "-X", "POST", "-H", "Content-Type: application/json", "-d",
                           '{"name": "curl"}', hook["webhook_url"]], capture_output=True, text=True, timeout=30)
    assert curl.returncode == 0, curl.stderr
    invoked = json.loads(curl.stdout)
    execution = wait_for(lambda: (e := cli.json("function", "execution", "show", invoked["execution_id"]))["status"] != "running" and e)
    assert execution["status"] == "success" and json.loads(execution["result"])["output"] == "Hi, curl"
    assert execution["description"] == f"Created by Webhook {hook['id']}" and execution["sync"] is False

    # -- jobs: one-shot, recurring (fires, counts down to done), pause/resume --------------------
    soon = (_dt.datetime.now(_dt.timezone.utc) + _dt.timedelta(minutes=5)).strftime("%Y-%m-%d %H:%M:%S")
    one_shot = cli.json("job", "create", "--function", function_id, "--name", "once", "--first-execution-time", soon,
                        "--function-input", '{"name": "job"}')
    assert one_shot["count"] == 1 and one_shot["status"] == "running" and one_shot["pattern"] is None
    ticking = cli.json("job", "create", "--function", function_id, "--pattern", "*/1 * * * * *", "--count", "2",
                       "--function-input", "tick")
    yearly = cli.json("job", "create", "--function-alias", "live", "--name", "yearly", "--pattern", "0 0 1 1 *")
    # An alias target shows the function the alias points to now (it was None: issue 20).
    assert yearly["function_alias"] == "live" and yearly["function_id"] == function_id
    assert {one_shot["id"], ticking["id"], yearly["id"]} <= {j["Id"] for j in cli.json("job", "list")}
    assert cli.json("job", "show", one_shot["id"])["name"] == "once"
    assert cli.json("job", "update", yearly["id"], "--status", "paused")["status"] == "paused"
    resumed = cli.json("job", "update", yearly["id"], "--status", "running", "--name", "yearly-resumed")
    assert resumed["status"] == "running" and resumed["name"] == "yearly-resumed"
    done = wait_for(lambda: (j := cli.json("job", "show", ticking["id"]))["status"] == "done" and j)
    assert done["count"] == 0
    fired = wait_for(lambda: len(r := cli.json("function", "execution", "list", "--filter",
                                                f"description=has:{ticking['id']}")) == 2 and r)
    assert all(e["Description"] == f"Created by Job {ticking['id']}" for e in fired)
    for job_id in (one_shot["id"], ticking["id"], yearly["id"]):
        cli("job", "delete", job_id)
    assert cli.json("job", "list") == []

    # -- refusals the CLI reports (non-zero exit, server's message) -------------------------------
    refused = cli("function", "delete", function_id, ok=False)
    assert refused["rc"] != 0 and "webhook" in (refused["err"] + refused["out"])
    refused = cli("runtime", "delete", runtime_id, ok=False)
    assert refused["rc"] != 0

    # -- clean up through the CLI: webhook, alias, versions, executions, functions, runtimes ------
    cli("webhook", "delete", hook["id"])
    assert cli.json("webhook", "list") == []
    cli("function", "alias", "delete", "live")
    assert cli.json("function", "alias", "list") == []
    cli("function", "version", "delete", function_id, "1")
    assert [v["Version_number"] for v in cli.json("function", "version", "list", function_id)] == [2]
    cli("function", "execution", "delete", "--function", function_id)
    assert [e for e in cli.json("function", "execution", "list") if e["Function_id"] == function_id] == []
    cli("function", "delete", function_id, fn2["id"])
    assert cli.json("function", "list") == []
    cli("runtime", "delete", runtime_id, spare["id"])
    assert cli.json("runtime", "list") == []

    elapsed = time.monotonic() - started
    print(f"\n{cli.commands} CLI commands against headwater serve in {elapsed:.1f}s", file=sys.stderr)
