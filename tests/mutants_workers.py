"""Weakenings of `workers` (proxy/workers.py), each with the tests that must then fail (see tests/mutation.py)."""

from __future__ import annotations

from tests.mutation import Mutant

T = "tests/test_workers.py"

MUTANTS = [
    Mutant(
        name="workers_fetch_their_own_tokens",
        path="proxy/app.py",
        old="            if provider_factory is not None:\n                provider = provider_factory(route, rm)",
        new="            if False:\n                provider = provider_factory(route, rm)",
        tests=(f"{T}::test_three_processes_share_the_port_and_one_token_fetch_per_refresh",),
    ),
    Mutant(
        name="metrics_not_merged",
        path="proxy/health.py",
        old="source = self.metrics.registry if pool is None else pool.collector(self.metrics.registry)",
        new="source = self.metrics.registry",
        tests=(f"{T}::test_three_processes_share_the_port_and_one_token_fetch_per_refresh",),
    ),
    Mutant(
        name="sigterm_not_forwarded",
        path="proxy/workers.py",
        old="                w.process.send_signal(signal.SIGTERM)",
        new="                pass",
        tests=(f"{T}::test_a_killed_worker_is_restarted_and_sigterm_drains_every_process",),
    ),
]
