"""Weakenings that the resource-bound tests must catch (run by `make mutants`): a per-connection buffer, as a
naive server that preallocates one would have, and a leaked descriptor per connection."""

from tests.mutation import Mutant

_T = "tests/faults/test_resource_bounds.py::"
_HOOK = (
    "        self.transport = transport  # type: ignore[assignment]  # uvloop's transports do not subclass asyncio's\n"
)

MUTANTS = [
    Mutant(
        name="a 64 KiB buffer held per connection",
        path="proxy/server.py",
        old=_HOOK,
        new=_HOOK + "        self.buffer_ = bytearray(b'.' * 65536)\n",
        tests=(_T + "test_memory_stays_bounded_under_1000_slow_clients_and_real_calls_still_get_through",),
    ),
    Mutant(
        name="a descriptor leaked per connection",
        path="proxy/server.py",
        old=_HOOK,
        new=_HOOK + "        globals().setdefault('LEAK_', []).append(transport.get_extra_info('socket').dup())\n",
        tests=(_T + "test_descriptors_and_sockets_return_to_baseline_after_connection_churn",),
    ),
]
