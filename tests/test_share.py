"""Sharing one token across replicas: the Lease election on a manual clock (no sleeps), the config rules, and
three proxy processes against the Kubernetes API stand-in and the emulator's token endpoint and scoring front end.

Every wait is bounded in time and count. The emulator issues 6 s tokens with refreshAfter at 4 s (its times are
whole seconds): with the shortest Lease (1 s, renewed every 0.25 s) the timing rule needs a 2 s refresh margin,
so a 3 s token would leave no refresh period at all.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import secrets
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.clock import ManualClock
from proxy.config.reader import parse
from proxy.config.settings import ConfigError
from proxy.emulator.kube import RunningKubeApi, start_kube_api
from proxy.emulator.kube_store import resource_by_name
from proxy.emulator.runner import RunningEmulator, start_emulator
from proxy.emulator.tls import make_local_tls
from proxy.kube.lease import Conflict, Elector, LeaseRecord
from proxy.kube.share import decode, encode
from tests.support.emulated import control_plane_auth, emulated_service, ready_of
from tests.support.procs import ProxyProcess
from tests.support.session import remember

CLIENT = "11111111-1111-1111-1111-111111111111"
NS = "default"
LEASE = "ep2-share"
SECRET = f"{LEASE}-token"
LIFETIME, REFRESH_AFTER, MARGIN = 6, 4, 2.0
SHARE = {"lease": LEASE, "lease_seconds": 1, "renew_seconds": 0.25}


# -- the election state machine, on a manual clock ---------------------------------------------------------------


class FakeLeases:
    """An in-memory Lease with resourceVersions and 409s; `before_write` runs between a read and a write."""

    def __init__(self) -> None:
        self.record: LeaseRecord | None = None
        self.version = 0
        self.writes: list[LeaseRecord] = []
        self.before_write: Callable[[], None] | None = None

    def _store(self, record: LeaseRecord) -> LeaseRecord:
        self.version += 1
        self.record = dataclasses.replace(record, resource_version=str(self.version))
        self.writes.append(self.record)
        return self.record

    async def get(self) -> LeaseRecord | None:
        return self.record

    async def create(self, record: LeaseRecord) -> LeaseRecord:
        self._hook()
        if self.record is not None:
            raise Conflict("exists")
        return self._store(record)

    async def update(self, record: LeaseRecord) -> LeaseRecord:
        self._hook()
        assert self.record is not None
        if record.resource_version != self.record.resource_version:
            raise Conflict("modified")
        return self._store(record)

    def _hook(self) -> None:
        hook, self.before_write = self.before_write, None
        if hook is not None:
            hook()


def elector(store: FakeLeases, clock: ManualClock, name: str) -> Elector:
    return Elector(store=store, identity=name, lease_seconds=15, renew_seconds=5, clock=clock)


async def test_first_replica_creates_the_lease_and_the_others_follow() -> None:
    clock, store = ManualClock(), FakeLeases()
    a, b = elector(store, clock, "a"), elector(store, clock, "b")
    assert await a.tick() and a.leading and a.term == 0
    assert not await b.tick() and b.holder == "a" and not b.leading
    assert store.record is not None and store.record.holder == "a" and store.record.lease_seconds == 15
    assert store.record.acquire_time == store.record.renew_time == clock.time()


async def test_leader_renews_and_a_follower_takes_over_only_after_expiry() -> None:
    clock, store = ManualClock(), FakeLeases()
    a, b = elector(store, clock, "a"), elector(store, clock, "b")
    await a.tick()
    acquired = clock.time()
    await clock.advance(5)
    assert await a.tick()  # renewal
    assert store.record is not None and store.record.renew_time == clock.time()
    assert store.record.acquire_time == acquired and store.record.transitions == 0
    await clock.advance(14.9)  # renewTime + 15 s not yet reached
    assert not await b.tick()
    # a's own view ended earlier: lease_seconds - renew_seconds after its renewal, before anyone could take over
    assert not a.leading
    await clock.advance(0.1)
    assert await b.tick() and b.term == 1
    assert store.record.holder == "b" and store.record.transitions == 1 and store.record.acquire_time == clock.time()
    assert not await a.verify()  # the deposed leader checks before writing: no longer ours
    assert not await a.tick() and a.holder == "b"


async def test_a_409_means_someone_else_won_and_the_loser_rereads() -> None:
    clock, store = ManualClock(), FakeLeases()
    a, b = elector(store, clock, "a"), elector(store, clock, "b")
    await a.tick()
    await clock.advance(16)  # expired: both b and c try to take it from the same read

    c = elector(store, clock, "c")

    def c_wins() -> None:
        assert store.record is not None
        store._store(dataclasses.replace(store.record, holder="c", renew_time=clock.time(), transitions=1))

    store.before_write = c_wins
    assert not await b.tick()
    assert b.holder == "c" and not b.leading and store.record is not None and store.record.holder == "c"
    assert [w.holder for w in store.writes] == ["a", "c"]  # b's update never landed
    assert not await c.tick() or c.leading  # c sees itself holding it (renews)


async def test_concurrent_creation_409_follows_the_creator() -> None:
    clock, store = ManualClock(), FakeLeases()
    b = elector(store, clock, "b")
    store.before_write = lambda: store._store(
        LeaseRecord(holder="a", lease_seconds=15, acquire_time=clock.time(), renew_time=clock.time(), transitions=0)
    )
    assert not await b.tick() and b.holder == "a"


async def test_release_frees_the_lease_for_an_immediate_takeover() -> None:
    clock, store = ManualClock(), FakeLeases()
    a, b = elector(store, clock, "a"), elector(store, clock, "b")
    await a.tick()
    await a.release()
    assert store.record is not None and store.record.holder is None
    assert await b.tick() and b.term == 1


def test_shared_secret_round_trips_and_refuses_malformed_data() -> None:
    from proxy.credentials.tokens import Token
    from proxy.kube.share import SharedToken

    shared = SharedToken(token=Token(value="tok", expires_at=10.5, refresh_at=8.0), fetched_at=2.0, holder="a", term=3)
    back = decode(encode(shared))
    assert not isinstance(back, str) and back.token.value == "tok" and back.term == 3 and back.token.refresh_at == 8.0
    assert "malformed" in str(decode({"token": "!!"}))
    assert "malformed" in str(decode({}))


class FakeSecrets:
    """The shared Secret in memory: content, resourceVersion, writes, 409 on a stale version."""

    def __init__(self) -> None:
        self.data: dict[str, str] | None = None
        self.version = 0
        self.writes: list[dict[str, str]] = []

    async def get(self) -> tuple[Any, str | None]:
        return (None, None) if self.data is None else (decode(self.data), str(self.version))

    async def write(self, data: dict[str, str], resource_version: str | None) -> None:
        if resource_version != (None if self.data is None else str(self.version)):
            raise Conflict("modified")
        self.version += 1
        self.data = data
        self.writes.append(data)

    def watch(self, deliver: Callable[[Any], None]) -> None:
        pass

    async def close(self) -> None:
        pass


class FakeRefresher:
    on_fetched: Any = None
    token: Any = None
    scheduling = True  # fetching on its own schedule, as a real refresher after start

    def adopt(self, token: Any) -> str | None:
        self.token = token
        return None

    def pause(self) -> None:
        self.scheduling = False

    def resume(self) -> None:
        self.scheduling = True


def provider(store: FakeLeases, secrets_: FakeSecrets, clock: ManualClock, name: str) -> Any:
    from prometheus_client import CollectorRegistry

    from proxy.config.settings import Share
    from proxy.kube.share import SharedTokenProvider
    from proxy.metrics import Metrics

    return SharedTokenProvider(
        route="r",
        share=Share(lease="l", secret="s", lease_seconds=15, renew_seconds=5),
        refresher=FakeRefresher(),  # type: ignore[arg-type]
        elector=elector(store, clock, name),
        secrets=secrets_,
        metrics=Metrics(CollectorRegistry()),
        clock=clock,
    )


def token_at(clock: ManualClock, *, refresh_in: float, expires_in: float, value: str = "tok") -> Any:
    from proxy.credentials.tokens import Token

    return Token(value=value, expires_at=clock.time() + expires_in, refresh_at=clock.time() + refresh_in)


async def test_a_deposed_leader_does_not_write_the_secret() -> None:
    clock, store, shared = ManualClock(), FakeLeases(), FakeSecrets()
    a, b = provider(store, shared, clock, "a"), provider(store, shared, clock, "b")
    assert await a._elector.tick()
    await a._write(token_at(clock, refresh_in=30, expires_in=60), clock.time())
    assert len(shared.writes) == 1 and decode(shared.data).holder == "a"  # type: ignore[arg-type,union-attr]
    await clock.advance(9)  # a still thinks it leads (its deadline is renewal + 15 - 5) ...
    store._store(dataclasses.replace(store.record, holder="b", transitions=1, renew_time=clock.time()))  # type: ignore[arg-type]
    assert a._elector.leading  # ... but b took the Lease (a paused process, say)
    await a._write(token_at(clock, refresh_in=30, expires_in=60, value="late"), clock.time())
    assert len(shared.writes) == 1, "a deposed leader overwrote the shared token"
    del b


async def test_a_leader_never_overwrites_a_newer_term_or_a_later_expiry() -> None:
    clock, store, shared = ManualClock(), FakeLeases(), FakeSecrets()
    a = provider(store, shared, clock, "a")
    assert await a._elector.tick()
    from proxy.kube.share import SharedToken

    newer = SharedToken(
        token=token_at(clock, refresh_in=30, expires_in=90), fetched_at=clock.time(), holder="x", term=5
    )
    shared.data = encode(newer)
    await a._write(token_at(clock, refresh_in=30, expires_in=60), clock.time())
    assert shared.writes == [], "a token from a later term was overwritten"


async def test_a_follower_refuses_a_stale_shared_token() -> None:
    clock, store, shared = ManualClock(), FakeLeases(), FakeSecrets()
    a, b = provider(store, shared, clock, "a"), provider(store, shared, clock, "b")
    assert await a._elector.tick()
    from proxy.kube.share import SharedToken

    fresh = SharedToken(
        token=token_at(clock, refresh_in=30, expires_in=60), fetched_at=clock.time(), holder="a", term=0
    )
    b._role = "follower"
    b._deliver(fresh)
    assert b._role == "follower" and b._refresher.token is fresh.token
    await clock.advance(30 + 15 - 0.1)  # refresh time + lease_seconds: not yet stale
    assert b._usable()
    await clock.advance(0.2)
    assert not b._usable()
    b._deliver(fresh)  # the same token again, now stale
    assert b._role == "fallback"


async def test_a_fallen_back_replica_stops_fetching_once_a_fresh_shared_token_arrives() -> None:
    clock, store, shared = ManualClock(), FakeLeases(), FakeSecrets()
    a, b = provider(store, shared, clock, "a"), provider(store, shared, clock, "b")
    assert await a._elector.tick()
    from proxy.kube.share import SharedToken

    b._role = "fallback"  # fetching its own token, as after the shared one went missing
    b._refresher.resume()
    fresh = SharedToken(
        token=token_at(clock, refresh_in=30, expires_in=60), fetched_at=clock.time(), holder="a", term=0
    )
    b._deliver(fresh)
    assert b._role == "follower" and b._refresher.token is fresh.token
    assert not b._refresher.scheduling, "a follower kept fetching on its own schedule"


# -- config ------------------------------------------------------------------------------------------------------


def shared_route(**share: Any) -> dict[str, Any]:
    return {
        "routes": [
            {
                "upstream": "https://x.example",
                "auth": {
                    "type": "aad",
                    "identity": {"type": "managed"},
                    "refresh": {"margin_seconds": 60},
                },
                "share": share,
            }
        ]
    }


def test_share_defaults_and_the_default_secret_name() -> None:
    route = parse(shared_route(lease="scoring"), {}).routes[0]
    assert route.share is not None
    assert (route.share.secret, route.share.lease_seconds, route.share.renew_seconds) == ("scoring-token", 15, 5.0)
    assert parse(shared_route(), {}).routes[0].share is None


@pytest.mark.parametrize(
    ("share", "margin", "problem"),
    [
        ({"lease": "s", "lease_seconds": 50, "renew_seconds": 20}, 60, "routes[0].share.lease_seconds: 50 + share"),
        ({"lease": "s"}, 0, "is more than auth.refresh.margin_seconds (0)"),
        ({"lease": "s", "lease_seconds": 5, "renew_seconds": 5}, 60, "routes[0].share.renew_seconds: 5 is not"),
        ({"lease": "Bad_Name"}, 60, "routes[0].share.lease: 'Bad_Name' is not allowed"),
        ({"secret": "x"}, 60, "routes[0].share.secret: is only used with share.lease"),
        ({"lease": "s", "lease_seconds": 0.5}, 60, "routes[0].share.lease_seconds: 0.5 is not allowed"),
    ],
)
def test_share_problems_name_the_key(share: dict[str, Any], margin: float, problem: str) -> None:
    doc = shared_route(**share)
    doc["routes"][0]["auth"]["refresh"]["margin_seconds"] = margin
    with pytest.raises(ConfigError) as err:
        parse(doc, {})
    assert any(line.startswith(problem) or problem in line for line in err.value.problems), err.value.problems


@pytest.mark.parametrize("auth_type", ["key", "mlserver", "jwt-file"])
def test_share_is_refused_for_kinds_that_cannot_share(auth_type: str) -> None:
    doc = {"routes": [{"upstream": "https://x.example", "auth": {"type": auth_type}, "share": {"lease": "s"}}]}
    with pytest.raises(ConfigError) as err:
        parse(doc, {})
    assert f"routes[0].share.lease: is not used with auth.type {auth_type!r}" in "\n".join(err.value.problems)


def test_share_variable_names_follow_the_keys() -> None:
    env = {
        "AML_AUTH_PROXY_ROUTE_UPSTREAM": "https://x.example",
        "AML_AUTH_PROXY_ROUTE_AUTH_TYPE": "aad",
        "AML_AUTH_PROXY_ROUTE_AUTH_REFRESH_MARGIN_SECONDS": "30",
        "AML_AUTH_PROXY_ROUTE_SHARE_LEASE": "s",
        "AML_AUTH_PROXY_ROUTE_SHARE_LEASE_SECONDS": "10",
    }
    share = parse(None, env).routes[0].share
    assert share is not None and share.lease_seconds == 10


# -- three proxy processes, one Lease, one token endpoint --------------------------------------------------------


@pytest.fixture
async def emu(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningEmulator]:
    secret = "client-secret-" + secrets.token_urlsafe(16)
    remember(secret)
    config = {
        "entra": {"clients": {CLIENT: secret}},
        "services": [
            emulated_service(
                "ep2",
                "v2",
                "westeurope",
                auth_mode="aml_token",
                token_lifetime_seconds=LIFETIME,
                token_refresh_after_seconds=REFRESH_AFTER,
            )
        ],
    }
    tls = make_local_tls(tmp_path_factory.mktemp("tls"))
    async with await start_emulator(config, ssl_context=tls.server_context(), ca_file=tls.ca_file) as emulator:
        emulator.secret = secret  # type: ignore[attr-defined]
        yield emulator


@pytest.fixture
async def kube() -> AsyncIterator[RunningKubeApi]:
    server = await start_kube_api(namespace=NS)
    try:
        yield server
    finally:
        await server.close()


def proxy_config(emu: RunningEmulator, tmp_path: Path, *, share: bool) -> dict[str, Any]:
    secret_file = tmp_path / "client-secret"
    secret_file.write_text(emu.secret + "\n")  # type: ignore[attr-defined]
    auth = {
        "type": "aml-endpoint-token",
        "endpoint": "ep2",
        "arm_url": emu.control_url,
        **control_plane_auth(ready_of(emu), CLIENT, secret_file),
        "refresh": {
            "margin_seconds": MARGIN,
            "jitter_seconds": 0.05,
            "min_interval_seconds": 0.05,
            "backoff_initial_seconds": 0.05,
            "backoff_max_seconds": 0.5,
            "timeout_seconds": 5,
        },
    }
    route = {"name": "ep2", "upstream": emu.service_urls["ep2"], "tls": {"ca_file": emu.ca_file}, "auth": auth}
    if share:
        route["share"] = SHARE
    return {"routes": [route], "access_log": False}


async def start_proxies(
    emu: RunningEmulator, kube: RunningKubeApi, tmp_path: Path, *, share: bool, names: tuple[str, ...]
) -> dict[str, ProxyProcess]:
    config = proxy_config(emu, tmp_path, share=share)
    env = ("env", f"KUBECONFIG={kube.kubeconfig_path}")
    started = await asyncio.gather(
        *(ProxyProcess.start(config, tmp_path, name=name, argv_prefix=(*env, f"POD_NAME={name}")) for name in names)
    )
    return dict(zip(names, started, strict=True))


async def token_calls(emu: RunningEmulator) -> int:
    async with aiohttp.ClientSession() as client, client.get(f"{emu.control_url}/_emulator/calls", ssl=False) as resp:
        return int((await resp.json())["token"].get("ep2", 0))


async def readyz(proxy: ProxyProcess) -> dict[str, Any]:
    async with aiohttp.ClientSession() as client, client.get(proxy.admin_url + "/readyz") as resp:
        body: dict[str, Any] = await resp.json()
        return body["routes"]["ep2"]


def lease_holder(kube: RunningKubeApi) -> str | None:
    lease = kube.store.get(resource_by_name("leases.coordination.k8s.io"), NS, LEASE)
    holder: str | None = lease["spec"].get("holderIdentity") or None
    return holder


def secret_writes(kube: RunningKubeApi) -> list[dict[str, Any]]:
    writes = kube.store.history(resource_by_name("secrets"), NS, SECRET)
    out = []
    for w in writes:
        data = {k: base64.b64decode(v).decode() for k, v in (w.obj.get("data") or {}).items()}
        out.append({"rv": w.rv, "type": w.type, "at": time.time(), **{k: v for k, v in data.items() if k != "token"}})
    return out


def lease_history(kube: RunningKubeApi) -> list[tuple[int, str | None]]:
    writes = kube.store.history(resource_by_name("leases.coordination.k8s.io"), NS, LEASE)
    return [(w.rv, w.obj["spec"].get("holderIdentity") or None) for w in writes]


async def wait_for(condition: Callable[[], Any], *, what: str, seconds: float = 10) -> Any:
    deadline = time.monotonic() + seconds
    for _ in range(int(seconds / 0.02) + 1):
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def score_loop(urls: list[str], stop: asyncio.Event, results: list[int]) -> None:
    """Requests round-robin over `urls` until `stop`, at most 20,000; every status recorded."""
    async with aiohttp.ClientSession() as client:
        for i in range(20000):
            if stop.is_set():
                return
            try:
                async with client.post(urls[i % len(urls)] + "/score", json={"data": [1, 2, 3]}) as resp:
                    await resp.read()
                    results.append(resp.status)
            except aiohttp.ClientError:
                results.append(0)
            await asyncio.sleep(0.01)


async def roles(proxies: dict[str, ProxyProcess]) -> dict[str, str]:
    return {name: (await readyz(p))["share"]["role"] for name, p in proxies.items()}


async def test_three_replicas_share_one_token_fail_over_and_fall_back(
    emu: RunningEmulator, kube: RunningKubeApi, tmp_path: Path
) -> None:
    proxies = await start_proxies(emu, kube, tmp_path, share=True, names=("proxy-a", "proxy-b", "proxy-c"))
    try:
        run_started = time.monotonic()
        calls_at_start = await token_calls(emu)
        leader = await wait_for(lambda: lease_holder(kube), what="a leader")
        await wait_for(lambda: _roles_settled(proxies, leader), what="one leader and two followers", seconds=15)
        followers = [n for n in proxies if n != leader]

        # Requests through the followers the whole time; the leader dies half-way.
        stop, results = asyncio.Event(), []
        loop_task = asyncio.create_task(score_loop([proxies[n].proxy_url for n in followers], stop, results))
        await asyncio.sleep(25)
        before_kill = secret_writes(kube)
        old = decode_last(kube)
        killed_at = time.time()
        proxies[leader].process.send_signal(signal.SIGKILL)
        await proxies[leader].wait(within=10)
        new_leader = await wait_for(lambda: (h := lease_holder(kube)) != leader and h, what="a new leader", seconds=10)
        first = await wait_for(
            lambda: next((w for w in secret_writes(kube)[len(before_kill) :] if w.get("holder") == new_leader), None),
            what="the new leader's first write",
            seconds=10,
        )
        gap = first["at"] - killed_at
        print(f"\nfailover gap (SIGKILL to the new leader's first Secret write): {gap:.2f} s")
        assert first["at"] < float(old["refresh_at"]), "the new leader refreshed after the old token's refresh time"
        await asyncio.sleep(max(0.0, 60 - (time.monotonic() - run_started)))
        stop.set()
        await loop_task
        elapsed = time.monotonic() - run_started
        calls = await token_calls(emu) - calls_at_start

        assert results and all(code == 200 for code in results), {c: results.count(c) for c in set(results)}
        print(f"requests through the followers: {len(results)}, failed: 0")

        # The Secret's history: ordered, each write by the then Lease holder, expiry never going back.
        writes = [w for w in secret_writes(kube) if w["type"] != "DELETED"]
        leases = lease_history(kube)
        expiries = [float(w["expires_at"]) for w in writes]
        assert expiries == sorted(expiries)
        for w in writes:
            holder = [h for rv, h in leases if rv < w["rv"]][-1]
            assert w["holder"] == holder, (w, leases)
        periods = len(writes)  # one refresh period per token written
        period = elapsed / periods
        print(
            f"shared: {calls} token calls in {elapsed:.0f} s, {periods} refresh periods of {period:.2f} s: "
            f"{calls / periods:.2f} calls per period"
        )
        assert calls / periods < 1.5

        # Fallback: no Secret -> the followers fall back and say so; the leader's next write brings them back.
        survivors = {n: proxies[n] for n in proxies if n != leader}
        follower = next(n for n in survivors if n != new_leader)
        await wait_for(lambda: _roles_settled(survivors, new_leader), what="settled roles", seconds=10)
        transitions = await survivors[follower].metric("aml_auth_proxy_share_transitions_total", route="ep2")
        kube.store.delete(resource_by_name("secrets"), NS, SECRET, user="test", preconditions=None)
        # The follower falls back at once and keeps its still-valid token until its own refresh time; the leader's
        # next write usually brings it back first (its own fetch is shown by the stale case below). The fallback
        # may be short, so its traces are checked: two role changes, to fallback and back.
        await wait_for(
            lambda: _more(
                survivors[follower].metric("aml_auth_proxy_share_transitions_total", route="ep2"), transitions + 1
            ),
            what="the follower to fall back and return",
            seconds=15,
        )
        await wait_for(lambda: _role_is(survivors[follower], "follower"), what="back to follower", seconds=10)
        after = await survivors[follower].metric("aml_auth_proxy_share_transitions_total", route="ep2")
        assert after >= transitions + 2
        fell_back = [e for e in survivors[follower].events() if e.get("event") == "share_role"]
        assert fell_back[-2]["role"] == "fallback" and fell_back[-1]["role"] == "follower", fell_back[-3:]

        # Stale: a token past its refresh time (+ lease_seconds) in a later term is not adopted; the follower
        # fetches its own.
        secret_obj = kube.store.get(resource_by_name("secrets"), NS, SECRET)
        now = time.time()
        stale = {
            "token": "stale-token",
            "expires_at": repr(now + 3.0),
            "refresh_at": repr(now - 5.0),
            "fetched_at": repr(now - 8.0),
            "holder": "someone-else",
            "term": "999",
        }
        secret_obj["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in stale.items()}
        kube.store.replace(resource_by_name("secrets"), NS, SECRET, secret_obj, user="test")
        await wait_for(lambda: _role_is(survivors[follower], "fallback"), what="fallback on stale", seconds=5)
    finally:
        for proxy in proxies.values():
            await proxy.stop()


def decode_last(kube: RunningKubeApi) -> dict[str, Any]:
    return secret_writes(kube)[-1]


async def _roles_settled(proxies: dict[str, ProxyProcess], leader: str) -> bool:
    got = await roles(proxies)
    return got == {n: "leader" if n == leader else "follower" for n in proxies}


async def _role_is(proxy: ProxyProcess, role: str) -> dict[str, Any] | None:
    state = await readyz(proxy)
    return state if state["share"]["role"] == role else None


async def _more(value: Awaitable[float], than: float) -> bool:
    return await value > than


async def fetched(proxy: ProxyProcess) -> float:
    labels = {"route": "ep2", "region": "unknown", "kind": "aml-endpoint-token", "outcome": "success"}
    return await proxy.metric("aml_auth_proxy_token_refreshes_total", **labels)


async def test_without_sharing_each_replica_fetches_its_own(
    emu: RunningEmulator, kube: RunningKubeApi, tmp_path: Path
) -> None:
    proxies = await start_proxies(emu, kube, tmp_path, share=False, names=("solo-a", "solo-b", "solo-c"))
    try:
        before = await token_calls(emu)
        refreshes_before = await fetched(proxies["solo-a"])
        started = time.monotonic()
        await asyncio.sleep(15)
        elapsed = time.monotonic() - started
        calls = await token_calls(emu) - before
        refreshes = await fetched(proxies["solo-a"]) - refreshes_before
        period = elapsed / refreshes
        print(
            f"\nnot shared: {calls} token calls in {elapsed:.0f} s, refresh period {period:.2f} s: "
            f"{calls / refreshes:.2f} calls per period"
        )
        assert calls / refreshes > 2.5
    finally:
        for proxy in proxies.values():
            await proxy.stop()
