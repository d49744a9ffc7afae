"""Keeps one route's token fresh: when to fetch, never how (that is the `TokenSource` of each kind).

- Schedule: at the server's refresh time (or a fraction of the lifetime) minus a margin and a little jitter,
  never later than the end of the token's use minus a safety gap, never sooner than `min_interval` after the last
  attempt.
- Use: a token is sent until its expiry minus `expiry_margin_seconds` (at most a tenth of its lifetime), never in
  its last seconds, which clock skew and the time a request takes to reach the front end would eat.
- Single flight: the schedule, a 401 from upstream, an operator and start-up share one in-flight fetch.
- Failure: exponential backoff with full jitter, capped; Retry-After honoured; permanent errors retry at the
  cap. The current token is served until its use ends; only then does the route go unready, and from then on
  transient failures are retried at least every UNUSABLE_RETRY_SECONDS.
- Logs: `token_expired` once when the route loses its token, `token_restored` with the outage's length when it has
  one again; a failure reason once per outage, not once per retry.
- The request path reads `current`: one clock reading compared with a deadline fixed when the token was
  installed; never an await, never an allocation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections.abc import Callable
from typing import Any

from proxy.clock import Clock
from proxy.config.settings import RefreshPolicy
from proxy.credentials.base import Credential, report_failover
from proxy.credentials.tokens import (
    PERMANENT,
    RefreshError,
    Token,
    TokenSource,
    TransientError,
)
from proxy.events import NO_EVENTS, TOKEN_EXPIRED, TOKEN_REFRESH_FAILING, TOKEN_REFRESH_RECOVERED, EventSink
from proxy.headers import render_credential
from proxy.logs import REDACTOR, event
from proxy.metrics import RouteMetrics

log = logging.getLogger("aml_auth_proxy.refresher")

SUCCESS = "success"


# While the route has no usable token (none yet, or its use has ended) every second of 503s counts: transient
# failures are retried after half of this to this much (jittered so replicas spread), whatever the backoff had grown
# to while the token in hand was good. Retry-After is still honoured; permanent errors still wait backoff_max.
UNUSABLE_RETRY_SECONDS = 1.0
# A token is used up to its expiry minus auth.refresh.expiry_margin_seconds, but never loses more than this part of
# its lifetime to the margin: a 3 s token (tests, demos) stays usable for 2.7 s.
EXPIRY_MARGIN_MAX_FRACTION = 0.1
_EPSILON = 1e-6  # clock readings this close to the end of a token's use count as the end (float rounding)
_MAX_REASONS = 32  # failure reasons remembered per outage for logging each once


class Refresher:
    """A CredentialProvider for fetched tokens and keys."""

    def __init__(
        self,
        *,
        route: str,
        source: TokenSource,
        header: str,
        template: str,
        placeholder: str,
        policy: RefreshPolicy,
        metrics: RouteMetrics,
        clock: Clock,
        rng: Callable[[], float] = random.random,
        events: EventSink = NO_EVENTS,
    ) -> None:
        self._events = events
        self._route = route
        self._source = source
        self._header = header
        self._template = template
        self._placeholder = placeholder
        self._policy = policy
        self._metrics = metrics
        self._clock = clock
        self._rng = rng
        self._token: Token | None = None
        self._creds: list[Credential] = []
        self._active = 0
        # What the request path reads: the credential to send and until when (no token: never).
        self._cred: Credential | None = None
        self._usable_until = -math.inf
        self._margin = 0.0  # of the installed token: expires_at - _usable_until
        self._lost_at: float | None = None  # when the installed token's use ended, once that has been reported
        self._not_before = -math.inf  # a Retry-After's end: no attempt before it
        self._reasons: set[tuple[str, str]] = set()  # failure reasons logged in this run of failures
        self._next_at = 0.0
        self._last_attempt = -1e18
        self._failures = 0
        self._last_outcome = "none"
        self._last_reason = ""
        self._inflight: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        # Sharing (proxy/kube/share.py): a follower adopts tokens instead of fetching on schedule, and a leader
        # publishes each token it fetches.
        self._scheduling = True
        self.on_fetched: Callable[[Token], None] | None = None

    # -- the request path ------------------------------------------------------------------------------------

    @property
    def current(self) -> Credential | None:
        if self._clock.time() >= self._usable_until:
            return None  # no token, or in its last expiry_margin_seconds, or expired: the caller gets 503
        return self._cred

    async def unauthorized(self, sent: Credential) -> Credential | None:
        """The upstream refused `sent`: try the secondary key if there is one (aml-keys), else one forced refresh.
        Keys fetched from the control plane are not switched back to the primary after the secondary is refused:
        both were likely regenerated, and a refresh fetches the pair that works."""
        current = self.current
        if current is not None and current is not sent:
            return current
        if len(self._creds) > 1 and self._creds[self._active] is sent and self._active == 0:
            self._active = 1
            self._cred = self._creds[1]
            report_failover(route=self._route, to="secondary", metrics=self._metrics, events=self._events)
            return self._creds[1]
        if self._inflight is None and self._clock.time() - self._last_attempt < self._policy.min_interval_seconds:
            return None  # a token this fresh was refused: refreshing again at once would not help
        await self.refresh_now("unauthorized")
        fresh = self.current
        return fresh if fresh is not None and fresh is not sent else None

    def retry_after(self) -> int:
        """Seconds until the next fetch attempt, for a 503's Retry-After."""
        return max(1, round(self._next_at - self._clock.time()))

    # -- probes and operators --------------------------------------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        if self.current is not None:
            return True, "ok"
        token, auth_type = self._token, self._source.auth_type
        if token is None:
            return False, f"no {auth_type} token yet" + (f": {self._last_reason}" if self._last_reason else "")
        last = f"; last refresh: {self._last_reason}" if self._last_reason else ""
        if token.expires_at is not None and self._clock.time() < token.expires_at:
            return False, f"{auth_type} token is within its {self._margin:g} s expiry margin{last}"
        return False, f"{auth_type} token expired{last}"

    def details(self) -> dict[str, Any]:
        now = self._clock.time()
        token = self._token
        expires = None if token is None or token.expires_at is None else round(token.expires_at - now, 3)
        return {
            "kind": self._source.auth_type,
            "expires_in": expires,
            "refresh_in": round(self._next_at - now, 3),
            "last_refresh": self._last_outcome,
            "last_error": self._last_reason or None,
            "consecutive_failures": self._failures,
        }

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.refresh_now("startup")

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._schedule_loop())
            group.create_task(self._source.watch(self.refresh_now))  # returns at once for a kind that watches nothing

    async def _schedule_loop(self) -> None:
        while True:
            now = self._clock.time()
            self._check_use(now)
            delay = self._next_at - now if self._scheduling else math.inf
            if delay > 0:
                if self._lost_at is None and self._token is not None:
                    delay = min(delay, self._usable_until - now)  # wake when its use ends, to say so at once
                self._wake.clear()
                sleeper = asyncio.ensure_future(self._clock.sleep(min(delay, 86400.0)))
                waker = asyncio.ensure_future(self._wake.wait())
                try:
                    await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    sleeper.cancel()
                    waker.cancel()
                continue  # the schedule may have moved: recompute
            await self.refresh_now("scheduled")

    async def close(self) -> None:
        if self._inflight is not None:
            self._inflight.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._inflight
        if self._token is not None:
            try:
                await self._source.revoke(self._token)
            except Exception as exc:  # shutdown must go on
                event(log, logging.WARNING, "revoke_failed", route=self._route, error_type=type(exc).__name__)
        await self._source.close()

    # -- sharing ---------------------------------------------------------------------------------------------

    def adopt(self, token: Token) -> str | None:
        """Install a token another replica fetched; schedule nothing. Returns why it was refused, or None."""
        now = self._clock.time()
        if not _header_safe(token.value) or token.secondary is not None:
            return "the shared credential contains control characters or spaces"
        if token.expires_at is None or token.expires_at <= now:
            return "the shared token has expired"
        current = self._token
        if current is None or current.value != token.value:
            self._metrics.last_success.set(now)  # a follower's credential is as fresh as the last new token it got
        self._install(token)
        self._metrics.token_state(expires_at=token.expires_at, next_refresh_at=self._next_at, failures=self._failures)
        return None

    def pause(self) -> None:
        """Stop fetching on schedule (a follower: the leader fetches). Forced refreshes still fetch."""
        self._scheduling = False
        self._wake.set()

    def resume(self) -> None:
        """Fetch on schedule again, from the token now installed (adopted or fetched)."""
        if self._scheduling:
            return
        self._scheduling = True
        now = self._clock.time()
        token = self._token
        self._next_at = now if token is None or self.current is None else self._schedule(token, now)
        self._wake.set()

    @property
    def token(self) -> Token | None:
        """The installed token (secret: for the share module only, never for logs)."""
        return self._token

    async def refresh_now(self, reason: str) -> None:
        """Fetch now, or join the fetch already in flight."""
        if self._inflight is None:
            self._inflight = asyncio.create_task(self._refresh(reason), name=f"refresh:{self._route}")
            self._inflight.add_done_callback(self._clear_inflight)
        await asyncio.shield(self._inflight)

    def _clear_inflight(self, task: asyncio.Task[None]) -> None:
        if self._inflight is task:
            self._inflight = None

    # -- the fetch and the schedule ----------------------------------------------------------------------------

    async def _refresh(self, reason: str) -> None:
        m = self._metrics
        started = self._clock.time()
        self._last_attempt = started
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            async with asyncio.timeout(self._policy.timeout_seconds * 3):
                token = await self._source.fetch(self._token)
        except RefreshError as exc:
            self._failed(exc, loop.time() - t0)
            return
        except TimeoutError:
            self._failed(TransientError("timed out"), loop.time() - t0)
            return
        except Exception as exc:  # a bug in a source must not kill the refresher
            self._failed(TransientError(f"unexpected {type(exc).__name__}"), loop.time() - t0)
            return
        elapsed = loop.time() - t0
        now = self._clock.time()
        if not all(_header_safe(v) for v in (token.value, token.secondary) if v is not None):
            # CR, LF, NUL or another control character would split or corrupt the credential header.
            self._failed(TransientError("the fetched credential contains control characters or spaces"), elapsed)
            return
        if token.expires_at is not None and token.expires_at <= now:
            # Installing it would throw away a token that may still be good, then refetch at min_interval forever.
            self._failed(TransientError("the fetched token has already expired"), elapsed)
            return
        previous = self._token
        if previous is not None and previous.expires_at is not None:
            m.token_remaining_at_refresh.observe(max(0.0, previous.expires_at - now))
        self._install(token)
        m.token_refresh(SUCCESS, elapsed)
        recovered = self._failures > 0
        self._failures = 0
        self._last_outcome = SUCCESS
        self._last_reason = ""
        self._reasons.clear()
        self._not_before = -math.inf
        m.last_success.set(now)
        self._next_at = self._schedule(token, now)
        m.token_state(expires_at=token.expires_at, next_refresh_at=self._next_at, failures=0)
        if self.on_fetched is not None:
            self.on_fetched(token)
        level = logging.INFO if recovered or reason in ("startup", "unauthorized", "operator") else logging.DEBUG
        event(
            log,
            level,
            "token_refreshed",
            route=self._route,
            kind=self._source.auth_type,
            trigger=reason,
            duration_ms=round(elapsed * 1000, 1),
            expires_in=_round(token.expires_at, now),
            refresh_in=round(self._next_at - now, 3),
            recovered=recovered,
        )
        if recovered:
            self._events.emit(
                warning=False,
                reason=TOKEN_REFRESH_RECOVERED,
                message=f"route {self._route}: {self._source.auth_type} token refreshed again after failures",
            )
        self._wake.set()

    def _install(self, token: Token) -> None:
        now = self._clock.time()
        secrets = [token.value] + ([token.secondary] if token.secondary else [])
        REDACTOR.add(*secrets, owner=f"refresher:{self._route}")
        self._creds = [
            Credential(header=self._header, value=render_credential(self._template, s, self._placeholder), label=label)
            for s, label in zip(secrets, ("primary", "secondary"), strict=False)
        ]
        self._active = 0
        self._token = token
        if token.expires_at is None:
            self._margin, usable_until = 0.0, math.inf
        else:
            lifetime = max(0.0, token.expires_at - now)
            self._margin = min(self._policy.expiry_margin_seconds, EXPIRY_MARGIN_MAX_FRACTION * lifetime)
            usable_until = token.expires_at - self._margin
        self._cred = self._creds[0]
        self._usable_until = usable_until
        self._metrics.ready.set(1)
        if self._lost_at is not None:
            event(
                log,
                logging.INFO,
                "token_restored",
                route=self._route,
                kind=self._source.auth_type,
                outage_seconds=round(max(0.0, now - self._lost_at), 3),
            )
        self._lost_at = None

    def _check_use(self, now: float) -> None:
        """Report, once, that the installed token's use has ended (expired, or in its expiry margin): 503s begin.
        Transient failures are retried soon from here on, whatever the backoff had grown to."""
        token = self._token
        if token is None or self._lost_at is not None or now < self._usable_until - _EPSILON:
            return
        self._lost_at = self._usable_until
        m = self._metrics
        m.ready.set(0)
        if self._last_outcome != PERMANENT:
            self._next_at = min(self._next_at, max(self._not_before, now + self._unusable_retry()))
        expired = token.expires_at is not None and now >= token.expires_at
        event(
            log,
            logging.WARNING,
            "token_expired",
            route=self._route,
            kind=self._source.auth_type,
            expiry_margin_seconds=round(self._margin, 3),
            expires_in=_round(token.expires_at, now),
            last_error=self._last_reason or None,
            consecutive_failures=self._failures,
            retry_in=round(self._next_at - now, 3),
        )
        m.token_state(expires_at=token.expires_at, next_refresh_at=self._next_at, failures=self._failures)
        what = "expired" if expired else f"is in its last {self._margin:g} s"
        self._events.emit(
            warning=True,
            reason=TOKEN_EXPIRED,
            message=f"route {self._route}: the {self._source.auth_type} token {what} and could not be refreshed; "
            "requests get 503",
        )

    def _unusable_retry(self) -> float:
        return UNUSABLE_RETRY_SECONDS * (0.5 + 0.5 * self._rng())

    def _failed(self, exc: RefreshError, elapsed: float) -> None:
        m = self._metrics
        now = self._clock.time()
        self._failures += 1
        # A reason not seen yet in this run of failures: a reason that comes back (two alternating) is not news.
        seen = (exc.outcome, exc.reason)
        changed = seen not in self._reasons and len(self._reasons) < _MAX_REASONS
        if changed:
            self._reasons.add(seen)
        self._last_outcome = exc.outcome
        self._last_reason = exc.reason
        m.token_refresh(exc.outcome, elapsed)
        p = self._policy
        if exc.outcome == PERMANENT:
            delay = p.backoff_max_seconds
        else:
            ceiling = min(p.backoff_max_seconds, p.backoff_initial_seconds * 2 ** (self._failures - 1))
            delay = max(p.min_interval_seconds * 0.1, self._rng() * ceiling)  # full jitter, never a hot loop
            if now >= self._usable_until - _EPSILON:  # no usable token: every second of 503s counts
                delay = min(delay, self._unusable_retry())
        if exc.retry_after is not None:
            retry_after = min(exc.retry_after, p.backoff_max_seconds)
            delay = max(delay, retry_after)
            self._not_before = now + retry_after
        self._next_at = now + delay
        token = self._token
        m.token_state(
            expires_at=None if token is None else token.expires_at,
            next_refresh_at=self._next_at,
            failures=self._failures,
        )
        m.ready.set(1 if self.current is not None else 0)
        if changed:
            self._events.emit(
                warning=True,
                reason=TOKEN_REFRESH_FAILING,
                message=f"route {self._route}: {self._source.auth_type} token refresh failing: {exc.reason}",
            )
        level = logging.ERROR if exc.outcome == PERMANENT else logging.WARNING
        if not changed:
            level = logging.DEBUG  # one line per reason in a run of failures, not one per retry
        event(
            log,
            level,
            "token_refresh_failed",
            route=self._route,
            kind=self._source.auth_type,
            outcome=exc.outcome,
            reason=exc.reason,
            consecutive_failures=self._failures,
            retry_in=round(delay, 3),
            still_valid_for=_round(None if token is None else token.expires_at, now),
            usable_for=None if token is None else round(max(0.0, self._usable_until - now), 3),
        )
        self._check_use(now)  # the token's use may have ended by now: say so
        self._wake.set()

    def _schedule(self, token: Token, now: float) -> float:
        p = self._policy
        floor = now + p.min_interval_seconds
        if token.expires_at is None:  # keys: fetch again periodically
            base = token.refresh_at if token.refresh_at is not None else now + 3600
            return max(floor, base)
        lifetime = max(0.0, token.expires_at - now)
        if token.refresh_at is not None:
            target = token.refresh_at - p.margin_seconds
        else:
            target = now + p.fraction * lifetime
        # Renewed before its use ends (expiry minus the installed token's margin), with a safety gap.
        latest = token.expires_at - self._margin - min(p.safety_seconds, 0.1 * lifetime)
        target = min(target, latest)
        target -= self._rng() * min(p.jitter_seconds, 0.1 * max(0.0, target - now))
        # Times already past on arrival (clock skew, a stale token): soon, but not in a loop.
        return max(target, floor)


def _header_safe(value: str) -> bool:
    """A credential goes into a header value verbatim: printable ASCII without spaces, and not empty."""
    return bool(value) and value.isascii() and value.isprintable() and " " not in value


def _round(at: float | None, now: float) -> float | None:
    return None if at is None else round(at - now, 3)
