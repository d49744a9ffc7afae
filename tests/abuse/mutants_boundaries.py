"""Weakenings that the open-proxy, smuggling and boundary tests must catch (run by `make mutants`)."""

from tests.mutation import Mutant

_B = "tests/abuse/test_boundaries.py::"
_S = "tests/abuse/test_smuggling.py::"
_PROXY_STAR = '        if lname in drop or lname.startswith("proxy-"):\n            continue\n'

MUTANTS = [
    Mutant(
        name="a refused request answered in plain text (no JSON error, no request id, no log line)",
        path="proxy/server.py",
        old="                    headers, answer = self.server.refusal(item.status, item.reason)\n",
        new='                    headers, answer = [("Content-Type", "text/plain")], b"Bad Request"\n',
        tests=(_S + "test_malformed_or_smuggling_requests_get_a_json_400_and_never_reach_the_upstream",),
    ),
    Mutant(
        name="dot segments not refused",
        path="proxy/forwarding.py",
        old='        if ("." in path or "%" in path) and _has_dot_segment(path):',
        new="        if False:",
        tests=(_B + "test_traversal_never_escapes_the_route_prefix",),
    ),
    Mutant(
        name="dot segments checked only undecoded",
        path="proxy/forwarding.py",
        old="    for candidate in (path, unquote(path), unquote(unquote(path))):",
        new="    for candidate in (path,):",
        tests=(_B + "test_traversal_never_escapes_the_route_prefix",),
    ),
    Mutant(
        name="absolute-form targets accepted",
        path="proxy/forwarding.py",
        old='        if not raw.startswith("/"):',
        new="        if False:",
        tests=(_B + "test_non_origin_targets_get_400_even_behind_a_catch_all_route",),
    ),
    Mutant(
        name="a route prefix matches without a segment boundary",
        path="proxy/forwarding.py",
        old='        return not prefix or path == prefix or path.startswith(prefix + "/")',
        new="        return not prefix or path.startswith(prefix)",
        tests=(_B + "test_encoded_slashes_and_lookalikes_match_no_route",),
    ),
    Mutant(
        name="route matching on the decoded path",
        path="proxy/forwarding.py",
        old="        rt = self.router.match(path)\n",
        new="        rt = self.router.match(unquote(path))\n",
        tests=(_B + "test_encoded_slashes_and_lookalikes_match_no_route",),
    ),
    Mutant(
        name="Proxy-* headers forwarded",
        path="proxy/headers.py",
        old=_PROXY_STAR,
        new=_PROXY_STAR.replace(' or lname.startswith("proxy-")', ""),
        tests=(_B + "test_caller_credentials_and_connection_named_headers_are_dropped",),
    ),
]
