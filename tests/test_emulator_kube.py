"""The Kubernetes API stand-in, driven by the official `kubernetes` client, unmodified.

The client is synchronous, so every call runs in a thread (asyncio.to_thread) while the server runs on the test's
loop. Every watch is bounded by timeoutSeconds; every wait for the server polls a bounded number of times.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import urllib3
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException
from kubernetes.config.incluster_config import InClusterConfigLoader

from proxy.emulator.kube import RunningKubeApi, start_kube_api
from proxy.emulator.kube_store import SUPERUSER, Rule
from tests.support.servers import KUBE_NS as NS
from tests.support.servers import KUBE_SA as SA
from tests.support.session import remember


def api_client(kube: RunningKubeApi, user: str = SUPERUSER, *, token: str | None = None) -> client.ApiClient:
    """A client for `user` configured by hand (the config loaders have their own tests); no retries, short timeouts."""
    cfg = client.Configuration()
    cfg.host = kube.url
    cfg.api_key = {"BearerToken": token if token is not None else kube.token(user)}
    cfg.api_key_prefix = {"BearerToken": "Bearer"}
    cfg.retries = False
    remember(cfg.api_key["BearerToken"])
    return client.ApiClient(cfg)


async def wait_for(condition: Callable[[], bool], *, what: str) -> None:
    for _ in range(300):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def admin(kube: RunningKubeApi, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.request(method, f"{kube.url}{path}", json=body) as resp:
        return resp.status, await resp.json()


def collect(func: Callable[..., Any], *args: Any, until: Callable[[list[dict[str, Any]]], bool], **kwargs: Any) -> list:
    """Run a watch until `until(events)` holds or the stream ends; the caller bounds it with timeout_seconds."""
    events: list[dict[str, Any]] = []
    stream = watch.Watch().stream(func, *args, **kwargs)
    try:
        for event in stream:
            events.append(event)
            if until(events):
                break
    finally:
        stream.close()
    return events


def status_of(exc: ApiException) -> dict[str, Any]:
    body = json.loads(exc.body)
    assert body["kind"] == "Status" and body["apiVersion"] == "v1" and body["status"] == "Failure"
    assert body["code"] == exc.status
    return body


def secret(name: str, value: str, **labels: str) -> client.V1Secret:
    return client.V1Secret(metadata=client.V1ObjectMeta(name=name, labels=labels or None), string_data={"key": value})


def decoded(obj: client.V1Secret) -> str:
    return base64.b64decode(obj.data["key"]).decode()


# -- objects and resource versions -------------------------------------------------------------------------------


async def test_secret_writes_bump_one_global_resource_version_and_lists_carry_it(kube: RunningKubeApi) -> None:
    with api_client(kube) as api:
        core = client.CoreV1Api(api)
        created = await asyncio.to_thread(core.create_namespaced_secret, NS, secret("keys", "v1"))
        assert decoded(created) == "v1" and created.string_data is None and created.type == "Opaque"
        assert created.metadata.uid and created.metadata.creation_timestamp is not None
        rv1 = int(created.metadata.resource_version)

        other = await asyncio.to_thread(core.create_namespaced_secret, NS, secret("other", "x"))
        assert int(other.metadata.resource_version) == rv1 + 1

        listed = await asyncio.to_thread(core.list_namespaced_secret, NS)
        assert listed.metadata.resource_version == str(kube.store.resource_version) == str(rv1 + 1)
        assert [s.metadata.name for s in listed.items] == ["keys", "other"]

        fetched = await asyncio.to_thread(core.read_namespaced_secret, "keys", NS)
        fetched.string_data = {"key": "v2"}
        replaced = await asyncio.to_thread(core.replace_namespaced_secret, "keys", NS, fetched)
        assert decoded(replaced) == "v2" and int(replaced.metadata.resource_version) == rv1 + 2
        assert replaced.metadata.uid == created.metadata.uid

        # an update that changes nothing writes nothing (etcd3 GuaranteedUpdate): same RV, no watch event
        again = await asyncio.to_thread(core.replace_namespaced_secret, "keys", NS, replaced)
        assert again.metadata.resource_version == replaced.metadata.resource_version

        patched = await asyncio.to_thread(
            core.patch_namespaced_secret, "keys", NS, {"metadata": {"labels": {"rotated": "yes"}}}
        )
        assert patched.metadata.labels == {"rotated": "yes"} and decoded(patched) == "v2"
        removed = await asyncio.to_thread(core.patch_namespaced_secret, "keys", NS, {"metadata": {"labels": None}})
        assert removed.metadata.labels is None

        deleted = await asyncio.to_thread(core.delete_namespaced_secret, "keys", NS)  # the client returns a dict
        assert deleted["status"] == "Success" and deleted["details"]["uid"] == created.metadata.uid
        with pytest.raises(ApiException) as missing:
            await asyncio.to_thread(core.read_namespaced_secret, "keys", NS)
    body = status_of(missing.value)
    assert (missing.value.status, body["reason"], body["message"]) == (404, "NotFound", 'secrets "keys" not found')
    assert body["details"] == {"name": "keys", "kind": "secrets"}


async def test_watch_from_a_listed_resource_version_sees_a_rotation(kube: RunningKubeApi) -> None:
    with api_client(kube) as api:
        core = client.CoreV1Api(api)
        await asyncio.to_thread(core.create_namespaced_secret, NS, secret("keys", "old"))
        await asyncio.to_thread(core.create_namespaced_secret, NS, secret("unrelated", "x"))
        listed = await asyncio.to_thread(core.list_namespaced_secret, NS, field_selector="metadata.name=keys")
        assert [s.metadata.name for s in listed.items] == ["keys"]

        watching = asyncio.create_task(
            asyncio.to_thread(
                collect,
                core.list_namespaced_secret,
                NS,
                field_selector="metadata.name=keys",
                resource_version=listed.metadata.resource_version,
                timeout_seconds=5,
                until=lambda events: any(e["type"] == "MODIFIED" for e in events),
            )
        )
        await wait_for(lambda: kube.store.watch_count == 1, what="the watch to open")
        await asyncio.to_thread(core.patch_namespaced_secret, "unrelated", NS, {"stringData": {"key": "y"}})
        rotated = await asyncio.to_thread(core.patch_namespaced_secret, "keys", NS, {"stringData": {"key": "new"}})
        events = await watching
    assert [e["type"] for e in events] == ["MODIFIED"]
    assert decoded(events[0]["object"]) == "new"
    assert events[0]["object"].metadata.resource_version == rotated.metadata.resource_version


async def test_watch_without_resource_version_starts_with_the_current_objects_and_honours_labels(
    kube: RunningKubeApi,
) -> None:
    with api_client(kube) as api:
        core = client.CoreV1Api(api)
        await asyncio.to_thread(core.create_namespaced_secret, NS, secret("a", "1", app="proxy"))
        await asyncio.to_thread(core.create_namespaced_secret, NS, secret("b", "2", app="other"))
        watching = asyncio.create_task(
            asyncio.to_thread(
                collect,
                core.list_namespaced_secret,
                NS,
                label_selector="app=proxy",
                timeout_seconds=5,
                until=lambda events: len(events) == 3,
            )
        )
        await wait_for(lambda: kube.store.watch_count == 1, what="the watch to open")
        # leaving the selector is a DELETED for this watch, joining it an ADDED (as the watch cache does)
        await asyncio.to_thread(core.patch_namespaced_secret, "a", NS, {"metadata": {"labels": {"app": "gone"}}})
        await asyncio.to_thread(core.patch_namespaced_secret, "b", NS, {"metadata": {"labels": {"app": "proxy"}}})
        events = await watching
    assert [(e["type"], e["object"].metadata.name) for e in events] == [
        ("ADDED", "a"),
        ("DELETED", "a"),
        ("ADDED", "b"),
    ]


async def test_bookmarks_carry_the_current_resource_version(kube: RunningKubeApi) -> None:
    with api_client(kube) as api:
        core = client.CoreV1Api(api)
        created = await asyncio.to_thread(core.create_namespaced_secret, NS, secret("keys", "v1"))
        # a write elsewhere moves the global counter; the bookmark tells the watcher it may resume from there
        lease = client.V1Lease(metadata=client.V1ObjectMeta(name="leader"), spec=client.V1LeaseSpec())
        await asyncio.to_thread(client.CoordinationV1Api(api).create_namespaced_lease, NS, lease)
        w = watch.Watch()
        events = await asyncio.to_thread(
            lambda: [
                e
                for e in w.stream(
                    core.list_namespaced_secret,
                    NS,
                    resource_version=created.metadata.resource_version,
                    allow_watch_bookmarks=True,
                    timeout_seconds=1,
                )
            ]
        )
    bookmarks = [e for e in events if e["type"] == "BOOKMARK"]
    assert bookmarks and len(bookmarks) == len(events)
    assert bookmarks[-1]["object"] == {
        "kind": "Secret",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": str(kube.store.resource_version)},
    }
    assert w.resource_version == str(kube.store.resource_version)


@pytest.mark.parametrize("timeout_seconds", [2, None], ids=["no-retry", "client-retries-once"])
async def test_a_watch_from_a_compacted_resource_version_raises_410(
    kube: RunningKubeApi, timeout_seconds: int | None
) -> None:
    with api_client(kube) as api:
        core = client.CoreV1Api(api)
        created = await asyncio.to_thread(core.create_namespaced_secret, NS, secret("keys", "v1"))
        await asyncio.to_thread(core.patch_namespaced_secret, "keys", NS, {"stringData": {"key": "v2"}})
        status, body = await admin(kube, "POST", "/_emulator/compact")
        assert status == 200 and body["compactedResourceVersion"] == str(kube.store.resource_version)
        old = created.metadata.resource_version
        kwargs = {} if timeout_seconds is None else {"timeout_seconds": timeout_seconds}
        with pytest.raises(ApiException) as gone:
            await asyncio.to_thread(
                collect, core.list_namespaced_secret, NS, resource_version=old, until=lambda _: True, **kwargs
            )
        assert gone.value.status == 410
        assert gone.value.reason == f"Expired: too old resource version: {old} ({kube.store.resource_version})"

        with pytest.raises(ApiException) as list_gone:
            await asyncio.to_thread(
                core.list_namespaced_secret, NS, resource_version=old, resource_version_match="Exact"
            )
    body = status_of(list_gone.value)
    assert (body["code"], body["reason"]) == (410, "Expired")
    watches = [c for c in kube.store.calls if c.get("verb") == "watch"]
    assert len(watches) == (1 if timeout_seconds else 2)


async def test_a_stale_lease_update_conflicts_and_the_history_shows_one_holder(kube: RunningKubeApi) -> None:
    now = datetime.datetime.now(datetime.UTC)
    with api_client(kube, "leader-a") as api_a, api_client(kube, "leader-b") as api_b:
        leases_a, leases_b = client.CoordinationV1Api(api_a), client.CoordinationV1Api(api_b)
        spec = client.V1LeaseSpec(holder_identity="a", lease_duration_seconds=15, acquire_time=now, renew_time=now)
        lease = client.V1Lease(metadata=client.V1ObjectMeta(name="proxy-leader"), spec=spec)
        await asyncio.to_thread(leases_a.create_namespaced_lease, NS, lease)
        with pytest.raises(ApiException) as exists:
            await asyncio.to_thread(leases_b.create_namespaced_lease, NS, lease)
        seen_a = await asyncio.to_thread(leases_a.read_namespaced_lease, "proxy-leader", NS)
        seen_b = await asyncio.to_thread(leases_b.read_namespaced_lease, "proxy-leader", NS)
        seen_a.spec.renew_time = now + datetime.timedelta(seconds=5)
        renewed = await asyncio.to_thread(leases_a.replace_namespaced_lease, "proxy-leader", NS, seen_a)
        assert renewed.spec.holder_identity == "a" and renewed.spec.renew_time > now
        seen_b.spec.holder_identity = "b"
        with pytest.raises(ApiException) as stale:
            await asyncio.to_thread(leases_b.replace_namespaced_lease, "proxy-leader", NS, seen_b)
        with pytest.raises(ApiException) as stale_patch:
            patch = {"metadata": {"resourceVersion": seen_b.metadata.resource_version}, "spec": {"holderIdentity": "b"}}
            await asyncio.to_thread(leases_b.patch_namespaced_lease, "proxy-leader", NS, patch)
    body = status_of(exists.value)
    assert (body["code"], body["reason"]) == (409, "AlreadyExists")
    assert body["message"] == 'leases.coordination.k8s.io "proxy-leader" already exists'
    for exc in (stale.value, stale_patch.value):
        body = status_of(exc)
        assert (body["code"], body["reason"]) == (409, "Conflict")
        assert body["message"] == (
            'Operation cannot be fulfilled on leases.coordination.k8s.io "proxy-leader": the object has been '
            "modified; please apply your changes to the latest version and try again"
        )
        assert body["details"] == {"name": "proxy-leader", "group": "coordination.k8s.io", "kind": "leases"}
    status, history = await admin(
        kube, "GET", f"/_emulator/history?resource=leases.coordination.k8s.io&namespace={NS}&name=proxy-leader"
    )
    assert status == 200
    assert [(w["verb"], w["user"], w["object"]["spec"]["holderIdentity"]) for w in history["writes"]] == [
        ("create", "leader-a", "a"),
        ("update", "leader-a", "a"),
    ]


# -- authentication and authorization ----------------------------------------------------------------------------


async def test_a_denied_verb_is_403_with_the_real_servers_message(kube: RunningKubeApi) -> None:
    rules = [
        {"user": SA, "verbs": ["get", "list", "watch"], "apiGroups": [""], "resources": ["secrets"],
         "resourceNames": ["keys"], "namespaces": [NS]},
        {"user": SA, "verbs": ["*"], "apiGroups": ["coordination.k8s.io"], "resources": ["leases"]},
    ]  # fmt: skip
    status, body = await admin(kube, "PUT", "/_emulator/rules", {"rules": rules})
    assert status == 200 and body["rules"][0]["resourceNames"] == ["keys"]
    with api_client(kube) as root:
        await asyncio.to_thread(client.CoreV1Api(root).create_namespaced_secret, NS, secret("keys", "v1"))
    with api_client(kube, SA) as api:
        core = client.CoreV1Api(api)
        assert decoded(await asyncio.to_thread(core.read_namespaced_secret, "keys", NS)) == "v1"
        one = await asyncio.to_thread(core.list_namespaced_secret, NS, field_selector="metadata.name=keys")
        assert len(one.items) == 1
        with pytest.raises(ApiException) as update:
            await asyncio.to_thread(core.patch_namespaced_secret, "keys", NS, {"stringData": {"key": "mine"}})
        with pytest.raises(ApiException) as list_all:
            await asyncio.to_thread(core.list_namespaced_secret, NS)
        with pytest.raises(ApiException) as elsewhere:
            await asyncio.to_thread(core.read_namespaced_secret, "keys", "kube-system")
    body = status_of(update.value)
    assert (update.value.status, body["reason"]) == (403, "Forbidden")
    assert body["message"] == (
        f'secrets "keys" is forbidden: User "{SA}" cannot patch resource "secrets" in API group "" '
        f'in the namespace "{NS}"'
    )
    assert body["details"] == {"name": "keys", "kind": "secrets"}
    assert status_of(list_all.value)["message"] == (
        f'secrets is forbidden: User "{SA}" cannot list resource "secrets" in API group "" in the namespace "{NS}"'
    )
    assert status_of(elsewhere.value)["reason"] == "Forbidden"
    denied = [(c["verb"], c["code"]) for c in kube.store.calls if c["user"] == SA and c["code"] == 403]
    assert denied == [("patch", 403), ("list", 403), ("get", 403)]


async def test_an_unknown_or_missing_token_is_401(kube: RunningKubeApi) -> None:
    with api_client(kube, token="not-a-token") as api, pytest.raises(ApiException) as denied:
        await asyncio.to_thread(client.CoreV1Api(api).list_namespaced_secret, NS)
    body = status_of(denied.value)
    assert (denied.value.status, body["reason"], body["message"]) == (401, "Unauthorized", "Unauthorized")
    async with aiohttp.ClientSession() as session, session.get(f"{kube.url}/api/v1/namespaces/{NS}/secrets") as resp:
        assert (resp.status, (await resp.json())["reason"]) == (401, "Unauthorized")


# -- events ------------------------------------------------------------------------------------------------------


async def test_events_refer_to_a_seeded_pod_in_both_event_apis(kube: RunningKubeApi) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "scorer-0", "namespace": NS}}
    pod["spec"] = {"containers": [{"name": "proxy", "image": "aml-auth-proxy"}]}
    status, seeded = await admin(kube, "POST", "/_emulator/objects", pod)
    assert status == 201 and seeded["metadata"]["uid"]
    with api_client(kube) as api:
        core = client.CoreV1Api(api)
        got = await asyncio.to_thread(core.read_namespaced_pod, "scorer-0", NS)
        assert got.metadata.uid == seeded["metadata"]["uid"]
        with pytest.raises(ApiException) as not_writable:
            await asyncio.to_thread(core.delete_namespaced_pod, "scorer-0", NS)
        ref = client.V1ObjectReference(kind="Pod", name="scorer-0", namespace=NS, uid=got.metadata.uid)
        core_event = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name="scorer-0."),
            involved_object=ref,
            reason="KeyRotated",
            message="primary key rotated",
            type="Normal",
        )
        made = await asyncio.to_thread(core.create_namespaced_event, NS, core_event)
        assert made.metadata.name.startswith("scorer-0.") and len(made.metadata.name) == len("scorer-0.") + 5
        events_api = client.EventsV1Api(api)
        new_event = client.EventsV1Event(
            metadata=client.V1ObjectMeta(name="scorer-0.lease"),
            event_time=datetime.datetime.now(datetime.UTC),
            reporting_controller="aml-auth-proxy",
            reporting_instance="scorer-0",
            action="Elect",
            reason="BecameLeader",
            regarding=ref,
            type="Normal",
        )
        await asyncio.to_thread(events_api.create_namespaced_event, NS, new_event)
        listed = await asyncio.to_thread(events_api.list_namespaced_event, NS)
        core_listed = await asyncio.to_thread(core.list_namespaced_event, NS)
    assert not_writable.value.status == 405
    assert [(e.reason, e.regarding.uid) for e in listed.items] == [("BecameLeader", got.metadata.uid)]
    assert [(e.reason, e.involved_object.uid) for e in core_listed.items] == [("KeyRotated", got.metadata.uid)]


# -- client configuration ----------------------------------------------------------------------------------------


async def test_the_official_kubeconfig_loader_accepts_the_written_kubeconfig(
    kube: RunningKubeApi, tmp_path: Path
) -> None:
    cfg = client.Configuration()
    path = kube.write_kubeconfig(tmp_path / "sa.kubeconfig", user=SA)
    config.load_kube_config(config_file=str(path), client_configuration=cfg)
    cfg.retries = False
    remember(kube.token(SA))
    with client.ApiClient(cfg) as api:
        created = await asyncio.to_thread(client.CoreV1Api(api).create_namespaced_secret, NS, secret("k", "v"))
    assert created.metadata.namespace == NS
    assert config.list_kube_config_contexts(config_file=str(kube.kubeconfig_path))[1]["context"]["namespace"] == NS
    assert [c["user"] for c in kube.store.calls] == [SA]


async def test_the_in_cluster_loader_reads_the_mounted_layout_over_tls(tmp_path: Path) -> None:
    async with await start_kube_api(tls=True, namespace=NS, directory=tmp_path / "server") as kube:
        files = kube.write_incluster(tmp_path / "serviceaccount", user=SA)
        assert files.namespace_file.read_text() == NS
        cfg = client.Configuration()
        loader = InClusterConfigLoader(
            token_filename=str(files.token_file), cert_filename=str(files.ca_file), environ=files.environ
        )
        loader.load_and_set(cfg)
        assert cfg.host == kube.url.replace("127.0.0.1", files.environ["KUBERNETES_SERVICE_HOST"])
        assert cfg.host.startswith("https://")
        cfg.retries = False
        remember(kube.token(SA))
        with client.ApiClient(cfg) as api:
            version = await asyncio.to_thread(client.VersionApi(api).get_code)
            lease = client.V1Lease(metadata=client.V1ObjectMeta(name="leader"), spec=client.V1LeaseSpec())
            await asyncio.to_thread(client.CoordinationV1Api(api).create_namespaced_lease, NS, lease)
    assert version.major == "1"
    assert [c["user"] for c in kube.store.calls] == [SA, SA]


# -- restarts ----------------------------------------------------------------------------------------------------


async def test_a_restart_ends_watches_refuses_connections_then_serves_the_same_objects(kube: RunningKubeApi) -> None:
    with api_client(kube) as api:
        core = client.CoreV1Api(api)
        created = await asyncio.to_thread(core.create_namespaced_secret, NS, secret("keys", "v1"))
        before = created.metadata.resource_version
        watching = asyncio.create_task(
            asyncio.to_thread(
                collect, core.list_namespaced_secret, NS, resource_version=before, timeout_seconds=10,
                until=lambda _: False,
            )
        )  # fmt: skip
        await wait_for(lambda: kube.store.watch_count == 1, what="the watch to open")
        lease = client.V1Lease(metadata=client.V1ObjectMeta(name="leader"), spec=client.V1LeaseSpec())
        await asyncio.to_thread(client.CoordinationV1Api(api).create_namespaced_lease, NS, lease)  # RV moves on
        status, body = await admin(kube, "POST", "/_emulator/restart", {"down_seconds": 0.5})
        assert (status, body["restarting"]) == (202, True)
        assert await asyncio.wait_for(watching, 5) == []  # the stream ended cleanly, long before its timeout

        await wait_for(lambda: not kube.serving, what="the listener to stop")
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", kube.port)
        # the client's pooled keep-alive connection was closed under it: reset, then refused on reconnect
        with pytest.raises((urllib3.exceptions.ProtocolError, urllib3.exceptions.NewConnectionError)):
            await asyncio.to_thread(core.read_namespaced_secret, "keys", NS)
        await asyncio.wait_for(kube.wait_restarted(), 5)

        again = await asyncio.to_thread(core.read_namespaced_secret, "keys", NS)
        assert again.metadata.resource_version == before and again.metadata.uid == created.metadata.uid
        assert kube.store.resource_version == int(before) + 1
        # a fresh watch cache: resuming from before the restart means list again
        with pytest.raises(ApiException) as gone:
            await asyncio.to_thread(
                collect, core.list_namespaced_secret, NS, resource_version=before, timeout_seconds=1,
                until=lambda _: True,
            )  # fmt: skip
        assert gone.value.status == 410


# -- edges -------------------------------------------------------------------------------------------------------


async def test_a_json_patch_is_refused_with_415(kube: RunningKubeApi) -> None:
    with api_client(kube) as api:
        core = client.CoreV1Api(api)
        await asyncio.to_thread(core.create_namespaced_secret, NS, secret("keys", "v1"))
        ops = [{"op": "replace", "path": "/data/key", "value": "djI="}]
        with pytest.raises(ApiException) as refused:
            await asyncio.to_thread(core.patch_namespaced_secret, "keys", NS, ops)
    assert status_of(refused.value)["reason"] == "UnsupportedMediaType"


async def test_discovery_endpoints_answer_the_client(kube: RunningKubeApi) -> None:
    with api_client(kube) as api:
        groups = await asyncio.to_thread(client.ApisApi(api).get_api_versions)
        core = await asyncio.to_thread(client.CoreV1Api(api).get_api_resources)
        leases = await asyncio.to_thread(client.CoordinationV1Api(api).get_api_resources)
    assert {g.name for g in groups.groups} == {"coordination.k8s.io", "events.k8s.io"}
    assert {r.name for r in core.resources} == {"secrets", "events", "pods"}
    assert [r.kind for r in leases.resources] == ["Lease"]


async def test_the_admin_api_rejects_bad_rules_and_reports_state(kube: RunningKubeApi) -> None:
    status, body = await admin(kube, "PUT", "/_emulator/rules", {"rules": [{"verbs": "get"}]})
    assert status == 400 and "verbs must be a list of strings" in body["error"]
    status, body = await admin(kube, "GET", "/_emulator/state")
    assert status == 200 and body == {"resourceVersion": "1", "compactedResourceVersion": "1", "watches": 0}
    status, body = await admin(kube, "POST", "/_emulator/tokens", {"user": SA})
    assert status == 200 and body["token"] == kube.token(SA)
    kube.set_rules([Rule(user=SA, verbs=("get",), resources=("secrets",), api_groups=("",))])
    assert (await admin(kube, "GET", "/_emulator/rules"))[1]["rules"][0]["verbs"] == ["get"]
