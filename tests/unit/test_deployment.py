"""The deployment as written: the Dockerfiles lint clean, the Kubernetes manifests validate offline
against the API schemas, and what they mount, pass and probe matches what the code reads."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath
from types import SimpleNamespace

import pytest
import yaml

from router.config import Config
from tests.services import REQUIRE

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "etc" / "kubernetes"
# The oldest Kubernetes the manifests promise to run on (policy/v1 PodDisruptionBudget needs 1.21).
KUBERNETES_VERSION = "1.25.0"
DOCKERFILES = [ROOT / "Dockerfile", *sorted(ROOT.glob("runtimes/*/Dockerfile"))]


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _all_documents() -> list[tuple[str, dict]]:
    return [(f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc)
            for path in sorted(MANIFESTS.glob("*.yaml")) for doc in _documents(path)]


def _one(kind: str, name: str) -> dict:
    found = [doc for _, doc in _all_documents() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name} in {MANIFESTS}, found {len(found)}"
    return found[0]


def _tool(name: str) -> str:
    """A command from PATH or from this virtualenv's bin/ (pip-installed linters land there)."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path:
        return path
    message = f"{name} is not installed (pip install -e '.[test]' brings it)"
    if REQUIRE:
        pytest.fail(message + " and HEADWATER_REQUIRE_SERVICES=1 forbids skipping", pytrace=False)
    pytest.skip(message)


@pytest.mark.parametrize("label,doc", _all_documents(), ids=[label for label, _ in _all_documents()])
def test_every_manifest_validates_against_the_kubernetes_schema(label, doc):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    # strict: an unknown or misspelt field is an error, as `kubectl apply --validate=strict` would say.
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_objects_the_engine_creates_validate_too():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    from engine.kubernetes import manifests

    pool = manifests.pool_deployment("3f1c2d4e-0000-4000-8000-000000000001", "headwater/runtime-python3:0.1.0",
                                     replicas=3, port=9090)
    kubernetes_validate.validate(pool, KUBERNETES_VERSION, strict=True)


def test_a_schema_violation_is_caught():
    """The check above can fail: a misspelt field in a Deployment is rejected."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    deployment = _one("Deployment", "headwater")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=[str(p.relative_to(ROOT)) for p in DOCKERFILES])
def test_dockerfiles_pass_hadolint(dockerfile):
    hadolint = _tool("hadolint")
    result = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _container() -> tuple[dict, dict]:
    pod = _one("Deployment", "headwater")["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def _config_files(container: dict) -> list[str]:
    args = container["args"]
    return [args[i + 1] for i, arg in enumerate(args) if arg == "--config-file"]


def _mounted_file(pod: dict, container: dict, path: str) -> str:
    """The text of a file the container sees at `path`, from the ConfigMap or the example Secret."""
    for mount in container["volumeMounts"]:
        root = PurePosixPath(mount["mountPath"])
        target = PurePosixPath(path)
        if target != root and root not in target.parents:
            continue
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        key = mount.get("subPath") or str(target.relative_to(root))
        if "configMap" in volume:
            data = _one("ConfigMap", volume["configMap"]["name"])["data"]
        elif "secret" in volume:
            example = [d for d in _documents(MANIFESTS / "secrets.example.yaml")
                       if d["metadata"]["name"] == volume["secret"]["secretName"]]
            assert example, f"secret {volume['secret']['secretName']} has no template in secrets.example.yaml"
            data = example[0]["stringData"]
        else:
            continue
        assert key in data, f"{path}: key {key!r} is not in the {mount['name']} volume's source"
        return data[key]
    raise AssertionError(f"{path} is not mounted into the container")


@pytest.fixture
def deployed_config(tmp_path) -> tuple[Config, dict, dict]:
    """The configuration a replica loads: each --config-file as mounted, later files winning."""
    pod, container = _container()
    files = []
    for index, path in enumerate(_config_files(container)):
        local = tmp_path / f"{index}-{PurePosixPath(path).name}"
        local.write_text(_mounted_file(pod, container, path))
        files.append(local)
    return Config.load(files), pod, container


def test_the_config_files_and_the_secret_load_as_written(deployed_config):
    config, _, _ = deployed_config
    assert str(config.data_dir) == "/var/lib/headwater"
    assert config.database.connection.startswith("postgresql+asyncpg://")
    assert config.bus.backend == "rabbitmq" and config.bus.url.startswith("amqp://")
    # Every replica must sign package download tokens with the same key, so it comes from the Secret.
    assert config.engine.download_token_secret
    assert config.engine.backend == "kubernetes" and config.engine.coordination == "etcd"


def _writable(pod: dict, container: dict, path: str) -> bool:
    volumes = {v["name"]: v for v in pod["volumes"]}
    best = None
    for mount in container["volumeMounts"]:
        root = PurePosixPath(mount["mountPath"])
        if PurePosixPath(path) == root or root in PurePosixPath(path).parents:
            if best is None or len(root.parts) > len(PurePosixPath(best["mountPath"]).parts):
                best = mount
    if best is None or best.get("readOnly"):
        return False
    volume = volumes[best["name"]]
    return "emptyDir" in volume or "persistentVolumeClaim" in volume


def test_every_path_headwater_writes_is_a_writable_volume(deployed_config):
    config, pod, container = deployed_config
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    written = {"data_dir": str(config.data_dir), "[storage] file_system_dir": str(config.storage.file_system_dir),
               "temporary files (uploads, tempfile)": "/tmp"}
    for what, path in written.items():
        assert _writable(pod, container, path), f"{what} = {path} is not on a writable volume"
    # Packages must be shared between replicas: any replica may be asked for any package.
    packages = next(m for m in container["volumeMounts"] if m["mountPath"] == str(config.storage.file_system_dir))
    volume = next(v for v in pod["volumes"] if v["name"] == packages["name"])
    claim = _one("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    assert _one("Deployment", "headwater")["spec"]["replicas"] > 1


def test_probes_reach_the_health_route_on_the_api_port(deployed_config):
    from router.api import build_api
    from router.metrics import Metrics

    config, _, container = deployed_config
    api = build_api(SimpleNamespace(config=config, metrics=Metrics()))  # the routes, without starting anything
    get_paths = {route.resource.canonical for route in api.router.routes() if route.method == "GET"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        http = container[probe]["httpGet"]
        assert http["path"] in get_paths, f"{probe} asks for {http['path']}, which the API does not serve"
        assert ports[http["port"]] == config.api.port
    assert config.api.host == "0.0.0.0", "in a pod the API must listen beyond loopback for the probes"


def test_the_image_runs_as_the_user_the_pod_requires():
    dockerfile = (ROOT / "Dockerfile").read_text()
    user = re.search(r"^USER (\d+)", dockerfile, re.M)
    assert user, "the Headwater image must name a numeric non-root USER"
    pod, container = _container()
    assert int(user.group(1)) == pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert re.search(r'^ENTRYPOINT \["headwater"\]', dockerfile, re.M)
    assert container["args"][0] == "serve"


def test_a_pod_disruption_budget_keeps_one_replica():
    budget = _one("PodDisruptionBudget", "headwater")
    selector = _one("Deployment", "headwater")["spec"]["selector"]["matchLabels"]
    assert budget["spec"]["selector"]["matchLabels"] == selector
    assert budget["spec"]["minAvailable"] >= 1


RUNTIME_DOCKERFILES = sorted(ROOT.glob("runtimes/*/Dockerfile"))


@pytest.mark.parametrize("dockerfile", RUNTIME_DOCKERFILES, ids=[p.parent.name for p in RUNTIME_DOCKERFILES])
def test_each_runtime_image_starts_its_own_server_as_a_non_root_user(dockerfile):
    """A pool pod has no command and runAsNonRoot: the image's entrypoint must run a server that is in
    the image, and its USER must be a numeric non-root uid (the kubelet cannot check a name)."""
    from engine.kubernetes import manifests
    from tests.fakes.kube_images import parse_dockerfile

    image = parse_dockerfile(dockerfile, ROOT / "runtimes")
    assert image.entrypoint, f"{dockerfile} has no exec-form ENTRYPOINT"
    program, server = image.entrypoint[0], image.entrypoint[1]
    assert program in image.binaries, f"{dockerfile}: the entrypoint's {program} is not what the image provides"
    assert server in image.files, f"{dockerfile}: the entrypoint's {server} is not copied into the image"
    uid = image.user.split(":", 1)[0]
    assert uid.isdigit() and int(uid) != 0, f"{dockerfile}: USER {image.user!r} is not a numeric non-root uid"
    # What the pool pod sets is what the server reads (python3's server serves go and php too).
    pool = manifests.pool_deployment("rt", "img", replicas=1, port=9090)
    container = pool["spec"]["template"]["spec"]["containers"][0]
    assert "command" not in container and "args" not in container
    source = (ROOT / "runtimes" / ("nodejs/server.js" if dockerfile.parent.name == "nodejs" else "python3/server.py")).read_text()
    for name in ("HEADWATER_RUNTIME_HOST", "HEADWATER_RUNTIME_PORT", "HEADWATER_RUNTIME_TOKEN", "HEADWATER_RUNTIME_PACKAGE_URLS"):
        assert name in source, f"the {dockerfile.parent.name} server never reads {name}, which pool pods are given"
    assert {e["name"] for e in container["env"]} >= {"HEADWATER_RUNTIME_HOST", "HEADWATER_RUNTIME_PORT"}


def test_the_build_script_publishes_the_names_the_fake_cluster_serves():
    from tests.fakes.kube_images import RUNTIME_IMAGE_PREFIX, default_images

    script = (ROOT / "runtimes" / "build.sh").read_text()
    registry, _, prefix = RUNTIME_IMAGE_PREFIX.rstrip("-").partition("/")
    assert f'registry=${{2:-{registry}}}' in script and f'"$registry/{prefix}-$name:$version"' in script
    assert set(default_images()) == {RUNTIME_IMAGE_PREFIX + p.parent.name for p in RUNTIME_DOCKERFILES}
    for doc in ("README.md", "runtimes/README.md"):
        assert "runtimes/build.sh" in (ROOT / doc).read_text() or "build.sh" in (ROOT / doc).read_text(), doc


def test_the_deployed_roles_are_valid_and_include_what_the_probes_need(deployed_config):
    config, _, container = deployed_config
    roles = set(config.default.roles)
    args = container["args"]
    if "--roles" in args:
        roles = set(args[args.index("--roles") + 1].split(","))
    # The probes answer in every process; a replica that takes traffic also needs the API.
    assert roles <= {"api", "router", "engine", "sources"} and "api" in roles
