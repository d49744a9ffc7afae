"""Weakenings that the fuzz test must catch (run by `make mutants`)."""

from tests.mutation import Mutant

_FUZZ = ("tests/abuse/test_fuzz.py",)
_LOOP = "    for name, value in incoming.items():\n        lname = name.lower()\n        if lname in drop or"
_PROXY_STAR = '        if lname in drop or lname.startswith("proxy-"):\n            continue\n'

MUTANTS = [
    Mutant(
        name="end-to-end headers reordered",
        path="proxy/headers.py",
        old=_LOOP,
        new=_LOOP.replace("incoming.items()", "sorted(incoming.items())"),
        tests=_FUZZ,
    ),
    Mutant(
        name="Proxy-* headers passed upstream",
        path="proxy/headers.py",
        old=_PROXY_STAR + '        if lname == "authorization"',
        new=_PROXY_STAR.replace(' or lname.startswith("proxy-")', "") + '        if lname == "authorization"',
        tests=_FUZZ,
    ),
    Mutant(
        name="headers named in Connection passed upstream",
        path="proxy/headers.py",
        old='    conn = incoming.getall("connection", ())\n    if conn:',
        new='    conn = incoming.getall("connection", ())\n    if False:',
        tests=_FUZZ,
    ),
    Mutant(
        name="the query string dropped",
        path="proxy/forwarding.py",
        old="        return self._base_path + path + query\n",
        new="        return self._base_path + path\n",
        tests=_FUZZ,
    ),
]
