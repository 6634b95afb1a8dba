"""The fake Kubernetes API behaves like the real one where the engine depends on it: server-set metadata,
selectors, the three patch types, 409 on stale resourceVersion, watch replay/410, validation, controllers."""

from __future__ import annotations

import asyncio
import sys

import pytest
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.rest import ApiException

from tests.fakes.kube_api import ApiError, FakeKubernetes, json_patch, merge_patch, parse_selector, selector_matches, strategic_merge
from tests.fakes.kube_images import FakeImage, default_images


@pytest.fixture
async def kube():
    # The official python image (root, CMD python3) besides the runtime images: these pods run scripts.
    fake = FakeKubernetes({**default_images(), "python": FakeImage(cmd=["python3"], binaries={"python3": sys.executable})})
    await fake.start()
    api = client.ApiClient(client.Configuration(host=fake.url))
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    await core.create_namespace({"metadata": {"name": "t"}})
    try:
        yield fake, core, apps
    finally:
        await api.close()
        await fake.stop()


def test_label_selectors():
    labels = {"a": "1", "b": "2"}
    assert selector_matches(parse_selector("a=1,b==2"), labels)
    assert not selector_matches(parse_selector("a!=1"), labels)
    assert selector_matches(parse_selector("a,!c"), labels)
    assert not selector_matches(parse_selector("!a"), labels)
    assert selector_matches(parse_selector("b in (2, 3),a notin (5)"), labels)
    assert not selector_matches(parse_selector("b notin (2)"), labels)
    with pytest.raises(ApiError):
        parse_selector("a=1=2")


def test_patch_semantics():
    doc = {"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {"containers": [{"name": "c", "image": "i:1", "env": [{"name": "X", "value": "1"}]}]}}
    assert merge_patch(doc, {"metadata": {"labels": {"a": None, "c": "3"}}})["metadata"]["labels"] == {"b": "2", "c": "3"}
    # A merge patch replaces lists; a strategic merge patch merges them by their merge key.
    assert merge_patch(doc, {"spec": {"containers": [{"name": "c", "image": "i:2"}]}})["spec"]["containers"] == [{"name": "c", "image": "i:2"}]
    merged = strategic_merge(doc, {"spec": {"containers": [{"name": "c", "image": "i:2"}]}})
    assert merged["spec"]["containers"][0] == {"name": "c", "image": "i:2", "env": [{"name": "X", "value": "1"}]}
    patched = json_patch(doc, [{"op": "replace", "path": "/metadata/labels/a", "value": "9"}, {"op": "remove", "path": "/metadata/labels/b"},
                               {"op": "add", "path": "/spec/containers/0/env/-", "value": {"name": "Y", "value": "2"}}])
    assert patched["metadata"]["labels"] == {"a": "9"} and len(patched["spec"]["containers"][0]["env"]) == 2
    with pytest.raises(ApiError) as err:
        json_patch(doc, [{"op": "test", "path": "/metadata/labels/a", "value": "nope"}])
    assert err.value.code == 422


POD = {"metadata": {"name": "p1", "labels": {"pool": "x"}},
       "spec": {"containers": [{"name": "c", "image": "python:3", "command": ["python3", "-c", "import time; time.sleep(60)"]}]}}


async def test_server_metadata_conflicts_and_validation(kube):
    fake, core, _ = kube
    pod = await core.create_namespaced_pod("t", POD)
    assert pod.metadata.uid and pod.metadata.resource_version and pod.metadata.creation_timestamp
    with pytest.raises(ApiException) as err:
        await core.create_namespaced_pod("t", POD)
    assert err.value.status == 409  # AlreadyExists
    while pod.status.phase != "Running":  # the kubelet's status writes bump resourceVersion too
        await asyncio.sleep(0.05)
        pod = await core.read_namespaced_pod("p1", "t")
    rv = pod.metadata.resource_version
    claimed = await core.patch_namespaced_pod("p1", "t", {"metadata": {"resourceVersion": rv, "labels": {"pool": None, "fn": "a"}}},
                                              _content_type="application/merge-patch+json")
    assert claimed.metadata.labels == {"fn": "a"} and int(claimed.metadata.resource_version) > int(rv)
    with pytest.raises(ApiException) as err:  # the second claimer still holds the old resourceVersion
        await core.patch_namespaced_pod("p1", "t", {"metadata": {"resourceVersion": rv, "labels": {"fn": "b"}}},
                                        _content_type="application/merge-patch+json")
    assert err.value.status == 409
    # Without a resourceVersion a patch is unconditional.
    await core.patch_namespaced_pod("p1", "t", {"metadata": {"labels": {"x": "y"}}})
    for bad in ({"metadata": {"labels": {"bad label": "v"}}}, {"spec": {"restartPolicy": "Never"}}):
        with pytest.raises(ApiException) as err:
            await core.patch_namespaced_pod("p1", "t", bad)
        assert err.value.status == 422
    with pytest.raises(ApiException) as err:
        await core.create_namespaced_pod("t", {**POD, "metadata": {"name": "Not_DNS"}})
    assert err.value.status == 422
    with pytest.raises(ApiException) as err:
        await core.read_namespaced_pod("nope", "t")
    assert err.value.status == 404
    assert [p.metadata.name for p in (await core.list_namespaced_pod("t", label_selector="fn=a,x")).items] == ["p1"]
    assert (await core.list_namespaced_pod("t", label_selector="pool")).items == []


async def test_watch_replays_from_a_resource_version_and_times_out(kube):
    fake, core, _ = kube
    start = fake.rv
    await core.create_namespaced_pod("t", POD)
    await core.patch_namespaced_pod("p1", "t", {"metadata": {"labels": {"step": "2"}}})
    seen = []
    w = watch.Watch()
    async for event in w.stream(core.list_namespaced_pod, "t", label_selector="step", resource_version=str(start), timeout_seconds=1):
        seen.append((event["type"], event["object"].metadata.labels.get("step")))
    await w.close()
    # As the API server's watch cache: a change that brings an object into the selection is ADDED.
    assert ("ADDED", "2") in seen
    await core.patch_namespaced_pod("p1", "t", {"metadata": {"labels": {"step": None}}})
    left = []
    w = watch.Watch()
    async for event in w.stream(core.list_namespaced_pod, "t", label_selector="step", resource_version=str(start), timeout_seconds=1):
        left.append((event["type"], event["object"].metadata.name))
    await w.close()
    assert left[-1] == ("DELETED", "p1")  # and one that leaves it is DELETED (pool watches rely on it)
    fake.events[:] = fake.events[-1:]  # compact the log: old versions are gone
    resp = await core.api_client.call_api("/api/v1/namespaces/t/pods", "GET", query_params=[("watch", "true"), ("resourceVersion", "1")],
                                          _preload_content=False, auth_settings=["BearerToken"])
    assert b'"code": 410' in await resp.read()


async def test_deployment_releases_relabelled_pods_and_replaces_them(kube):
    fake, core, apps = kube
    await apps.create_namespaced_deployment("t", {
        "metadata": {"name": "pool"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"pool": "x"}},
                 "template": {"metadata": {"labels": {"pool": "x"}},
                              "spec": {"containers": [{"name": "c", "image": "python:3", "command": ["python3", "-c", "import time; time.sleep(60)"]}]}}}})

    async def ready(n):
        for _ in range(100):
            pods = (await core.list_namespaced_pod("t", label_selector="pool=x")).items
            if len([p for p in pods if p.status.phase == "Running"]) == n:
                return pods
            await asyncio.sleep(0.05)
        raise AssertionError("pool not ready")

    pods = await ready(2)
    taken = pods[0].metadata.name
    await core.patch_namespaced_pod(taken, "t", {"metadata": {"labels": {"pool": None, "fn": "a"}}})
    pods = await ready(2)
    assert taken not in [p.metadata.name for p in pods]
    for _ in range(50):
        if not (await core.read_namespaced_pod(taken, "t")).metadata.owner_references:
            break
        await asyncio.sleep(0.05)
    assert not (await core.read_namespaced_pod(taken, "t")).metadata.owner_references
    dep = await apps.read_namespaced_deployment("pool", "t")
    assert dep.status.ready_replicas == 2 and dep.metadata.generation == 1
    # Deleting the Deployment collects its pods but not the released one.
    await apps.delete_namespaced_deployment("pool", "t")
    for _ in range(100):
        if [p.metadata.name for p in (await core.list_namespaced_pod("t")).items] == [taken]:
            break
        await asyncio.sleep(0.05)
    assert [p.metadata.name for p in (await core.list_namespaced_pod("t")).items] == [taken]


async def test_unknown_image_reports_err_image_pull(kube):
    fake, core, _ = kube
    await core.create_namespaced_pod("t", {"metadata": {"name": "p2"}, "spec": {"containers": [{"name": "c", "image": "nowhere/x:1"}]}})
    for _ in range(50):
        pod = await core.read_namespaced_pod("p2", "t")
        statuses = pod.status.container_statuses or []
        if statuses and statuses[0].state.waiting and statuses[0].state.waiting.reason == "ErrImagePull":
            break
        await asyncio.sleep(0.05)
    assert pod.status.phase == "Pending" and statuses[0].state.waiting.reason == "ErrImagePull"
