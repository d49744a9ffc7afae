"""Weakenings that the file tests must catch (run by `make mutants`)."""

from tests.mutation import Mutant

MUTANTS = [
    Mutant(
        name="an existing file keeps its old, wider mode",
        path="proxy/emulator/secretdir.py",
        old="    os.chmod(path, 0o600)  # an existing file keeps its old mode through O_CREAT\n",
        new="",
        tests=("tests/abuse/test_files.py::test_files_with_secrets_written_for_local_development_are_mode_0600",),
    ),
    Mutant(
        name="key files written world-readable",
        path="proxy/emulator/secretdir.py",
        old="*, file_mode: int = 0o600)",
        new="*, file_mode: int = 0o644)",
        tests=("tests/abuse/test_files.py::test_files_with_secrets_written_for_local_development_are_mode_0600",),
    ),
]
