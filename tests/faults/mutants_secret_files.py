"""Weakenings that the key-file fault tests must catch (run by `make mutants`)."""

from tests.mutation import Mutant

_T = "tests/faults/test_secret_file_faults.py::"
_BROKEN = _T + "test_a_broken_key_file_keeps_the_last_good_key_reports_it_once_and_recovers"
_KEYS = "proxy/credentials/keys.py"
_ERROR_BRANCH = '        self._metrics.reloads["error"].inc()\n        if self._errors.get(slot) != reason:\n'

MUTANTS = [
    Mutant(
        name="a FIFO in the key's place blocks the event loop",
        path="proxy/credentials/files.py",
        old="os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC",
        new="os.O_RDONLY | os.O_CLOEXEC",
        tests=(_BROKEN + "[replaced by a FIFO]",),
    ),
    Mutant(
        name="a half-written key is used at once",
        path=_KEYS,
        old="0 <= time.time() - sig[2] / 1e9 < SETTLE_SECONDS",
        new="False",
        tests=(_T + "test_a_key_file_rewritten_in_place_is_never_used_half_written",),
    ),
    Mutant(
        name="a file still broken is read again on every poll",
        path=_KEYS,
        old="if slot in self._sigs and sig == self._sigs[slot]",
        new="if sig is not None and sig == self._sigs.get(slot)",
        tests=(_BROKEN + "[deleted]",),
    ),
    Mutant(
        name="a broken file drops the last good key",
        path=_KEYS,
        old=_ERROR_BRANCH,
        new=_ERROR_BRANCH.replace(".inc()\n", ".inc()\n        self._creds.pop(slot, None)\n"),
        tests=(_BROKEN + "[emptied]",),
    ),
    Mutant(
        name="a chmod goes unnoticed (no ctime or mode in the signature)",
        path="proxy/credentials/files.py",
        old="st.st_size, st.st_ctime_ns, st.st_mode)",
        new="st.st_size, 0, 0)",
        tests=(_BROKEN + "[unreadable]",),
    ),
    Mutant(
        name="/readyz does not report a broken file",
        path=_KEYS,
        old="        if self._errors:\n",
        new="        if False:\n",
        tests=(_BROKEN + "[emptied]",),
    ),
]
