"""The test suite. Importing it first checks that no compiled module is older than its source."""

from tests.support.compiled import check_not_stale

check_not_stale()
