"""Weakenings of the request metrics that their tests must catch (run by `make mutants`)."""

from tests.mutation import Mutant

_T = "tests/test_metrics.py::test_request_families_match_prometheus_clients_counter_and_histogram"

MUTANTS = [
    Mutant(
        name="a duration on a bucket's bound counted in the next bucket",
        path="proxy/metrics.py",
        old="        self.buckets[bisect_left(DURATION_BUCKETS, seconds)] += 1\n",
        new="        self.buckets[bisect_left(DURATION_BUCKETS, seconds + 1e-12)] += 1\n",
        tests=(_T,),
    ),
    Mutant(
        name="histogram buckets exposed per bucket, not cumulative",
        path="proxy/metrics.py",
        old="        running += n\n",
        new="        running = n\n",
        tests=(_T,),
    ),
    Mutant(
        name="an unknown method counted under its own name",
        path="proxy/metrics.py",
        old='        key = (method if method in METHODS else "other", status)\n',
        new="        key = (method, status)\n",
        tests=(_T,),
    ),
]
