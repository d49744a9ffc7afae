"""Weakenings of token sharing (proxy/kube/), each with the tests that must then fail (see tests/mutation.py)."""

from __future__ import annotations

from tests.mutation import Mutant

UNIT = "tests/test_share.py"
E2E = "tests/test_share.py::test_three_replicas_share_one_token_fail_over_and_fall_back"

MUTANTS = [
    Mutant(
        name="write_without_checking_the_lease",
        path="proxy/kube/share.py",
        old="            if not await self._elector.verify():",
        new="            if not self._elector.leading:",
        tests=(f"{UNIT}::test_a_deposed_leader_does_not_write_the_secret",),
    ),
    Mutant(
        name="no_reread_after_409",
        path="proxy/kube/lease.py",
        old="        except Conflict:\n            return await self._reread()",
        new="        except Conflict:\n            return False",
        tests=(f"{UNIT}::test_a_409_means_someone_else_won_and_the_loser_rereads",),
    ),
    Mutant(
        name="followers_ignore_staleness",
        path="proxy/kube/share.py",
        old="min(shared.stale_after + self._share.lease_seconds, shared.token.expires_at or 0)",
        new="(shared.token.expires_at or 0)",
        tests=(f"{UNIT}::test_a_follower_refuses_a_stale_shared_token",),
    ),
    Mutant(
        name="overwrite_a_newer_term",
        path="proxy/kube/share.py",
        old="                content.term > self._elector.term or",
        new="                False and",
        tests=(f"{UNIT}::test_a_leader_never_overwrites_a_newer_term_or_a_later_expiry",),
    ),
    Mutant(
        name="take_an_unexpired_lease",
        path="proxy/kube/lease.py",
        old="        return self.renew_time + self.lease_seconds <= now",
        new="        return True",
        tests=(f"{UNIT}::test_leader_renews_and_a_follower_takes_over_only_after_expiry",),
    ),
    Mutant(
        name="followers_fetch_anyway",
        path="proxy/kube/share.py",
        old="        self._refresher.pause()\n        self._set_role(FOLLOWER,",
        new="        self._set_role(FOLLOWER,",
        tests=(f"{UNIT}::test_a_fallen_back_replica_stops_fetching_once_a_fresh_shared_token_arrives",),
    ),
    Mutant(
        name="no_timing_rule",
        path="proxy/config/checks.py",
        old="    if isinstance(margin, float) and lease_seconds + renew > margin:",
        new="    if False:",
        tests=(f"{UNIT}::test_share_problems_name_the_key",),
    ),
]
