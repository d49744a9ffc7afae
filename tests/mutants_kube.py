"""Weakenings of the Secret watch and the Event recorder; each must make its tests fail (tests/mutation.py)."""

from __future__ import annotations

from tests.mutation import Mutant

SECRETS = "tests/test_kube_secrets.py"
EVENTS = "tests/test_kube_events.py"

MUTANTS = [
    Mutant(
        name="no relist on 410: the watch retries from its expired resourceVersion",
        path="proxy/kube/secrets.py",
        old="""            except _Expired:
                rv = None
""",
        new="""            except _Expired:
                worker.wait(0.05)
""",
        tests=(f"{SECRETS}::test_an_expired_watch_lists_again_and_sees_the_next_rotation",),
    ),
    Mutant(
        name="events not aggregated: every report creates a new Event",
        path="proxy/kube/events.py",
        old="if sent is not None and report.at - sent.last <= WINDOW_SECONDS:",
        new="if False:",
        tests=(f"{EVENTS}::test_refresh_failure_expiry_and_recovery_become_aggregated_events_on_the_pod",),
    ),
    Mutant(
        name="RBAC error swallowed: a 403 keeps the route waiting with no reason",
        path="proxy/kube/secrets.py",
        old="        if err.status in (401, 403) or self._state is None or self._state.data is None:",
        new="        if err.status not in (401, 403) and (self._state is None or self._state.data is None):",
        tests=(f"{SECRETS}::test_rbac_denial_is_unready_naming_the_secret_and_verb_and_recovers_when_granted",),
    ),
    Mutant(
        name="no rate limit",
        path="proxy/kube/events.py",
        old="        if tokens < 1.0:",
        new="        if False:",
        tests=(f"{EVENTS}::test_the_token_bucket_allows_a_burst_then_one_event_per_refill",),
    ),
    Mutant(
        name="a bad Secret update replaces the last good key",
        path="proxy/credentials/keys.py",  # the count-and-log of a failed load, shared by files and Secrets
        old="""        self._metrics.reloads["error"].inc()
""",
        new="""        self._metrics.reloads["error"].inc()
        self._creds.pop(slot, None)
""",
        tests=(f"{SECRETS}::test_a_bad_update_keeps_the_last_good_key_and_a_good_one_replaces_it",),
    ),
]
