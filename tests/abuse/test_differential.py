"""Differential fuzzing of both sides of the proxy's HTTP/1.1 stack against h11, a strict HTTP/1.1 parser.

Caller side: hypothesis writes request byte streams (valid, nearly valid and hostile: framing header
combinations, odd whitespace, obsolete folding, bare CR and LF, chunk extensions and trailers, huge chunk
sizes, non-origin and dot-segment targets, Expect, Upgrade, HTTP/1.0 keep-alive, pipelining, bytes split
over several sends, early half-close, endless header lines) to the proxy, whose one route leads to a recording
upstream. h11, as a server, reads the same bytes: the upstream must receive exactly the requests h11 accepts,
in order (method, target, end-to-end headers, body), and nothing from the first one h11 refuses on; every
request the proxy reads gets one well-framed answer that h11, as a client, reads cleanly, in order. Where
the proxy documents a stricter answer than h11 (README "Answers from the proxy itself"), the oracle lists it as
an exception (`Rule`s in tests/abuse/differential.py, one comment each); nothing else may differ.

Upstream side: hypothesis writes answer byte streams (interim answers, odd statuses, framing header
combinations, Connection naming headers, bodies on 204/304/HEAD answers, trailers, extra bytes, closes and
stalls at any point, writes split at any point, endless trailers) from a scripted upstream. The caller gets
the answer h11 (as a client) reads from those bytes (status, end-to-end headers, body), or a 502/504 JSON
answer, or a cut connection; never bytes of another answer; an upstream connection whose answer forbade reuse
never carries another request.

Both sides: the proxy logs no error, no conversation outlasts the configured timeouts, and the process's RSS
(the rig runs in-process) stays within a bound per case.

Budget: 800 examples per side by default (`make test`: the same ones every run, about 35 s for both), or
FUZZ_EXAMPLES=N (`make fuzz`: new ones each run, failures shrunk; it prints how many cases ran). Each failure
the fuzzer found is kept below as a plain regression test with its exact bytes.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, Phase, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from tests.abuse.differential import (
    CALLER_HOLDS,
    CASE_SECONDS,
    SENTINEL,
    TOTAL_TIMEOUT,
    Caller,
    Rig,
    Script,
    Verdict,
    check_caller_case,
    check_pool,
    check_upstream_answer,
    complete_answers,
    converse,
    judge_answer,
    peak_rss_bytes,
    plan_requests,
    reset_peak,
    rss_bytes,
    running_rig,
)
from tests.support.session import new_key

FUZZ_EXAMPLES = os.environ.get("FUZZ_EXAMPLES", "")
EXAMPLES = int(FUZZ_EXAMPLES) if FUZZ_EXAMPLES else 800
# `make test` replays the same examples every time and reports a failure as found (unshrunk: the regressions below
# hold the shrunk ones); `make fuzz` (FUZZ_EXAMPLES=N) explores new examples and shrinks what fails.
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=not FUZZ_EXAMPLES,
    phases=list(Phase) if FUZZ_EXAMPLES else [Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
RSS_GROWTH_BOUND = 6 << 20  # per case: the floods below send 2 MiB (caller) and 8 MiB (upstream)
CALLER_FLOOD = 2 << 20


def tally(text: str) -> None:
    """A line of hypothesis's statistics (shown with --hypothesis-show-statistics), when hypothesis runs the case."""
    if currently_in_test_context():
        event(text)


@pytest.fixture(scope="module")
def rig(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    with running_rig(tmp_path_factory.mktemp("differential") / "secret", new_key("differential")) as running:
        yield running
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:  # how many cases ran (make fuzz shows it)
        with capture.global_and_fixture_disabled():
            reporter.write_line(
                f"\ndifferential fuzzing: {running.caller_cases} caller cases, {running.upstream_cases} upstream "
                f"cases ({running.exchanges} upstream exchanges)"
            )


# -- the caller side: request byte streams


@dataclass
class CallerCase:
    stream: bytes
    cuts: list[int]  # split points: each piece is sent on its own
    flood: int = 0  # bytes of b"a" sent after the stream (it ends inside a header line)
    half_close: bool = False  # shut the sending side right after the last byte


CLEAN_METHODS = ["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "HEAD", "QUERY", "PROPFIND"]
ODD_METHODS = ["TRACE", "CONNECT", "FOO", "get", "PRI", "GET/", "G\x00T", "M-SEARCH", "SOURCE"]
CLEAN_TARGETS = st.one_of(
    st.sampled_from(["/score", "/score?a=1&b=%20", "/a/b/c", "/", "/a?", "/a#frag", "/a;p", "//a", "/a%2Fb"]),
    st.text(alphabet="abcXYZ019-._~!$&'()*+,;=:@/%?", min_size=1, max_size=16).map(lambda s: "/" + s),
)
ODD_TARGETS = [
    "/a/../b",
    "/a/./b",
    "/%2e%2e/x",
    "/a/%2E/b",
    "/%252e%252e/x",
    "/a/..\\b",
    "/..",
    "/a/..?x=/../",
    "http://evil.example/x",
    "HTTP://evil/",
    "evil.example:443",
    "*",
    "/\u00fc",
    "/a\x7fb",
    "/a b",
    "",
    "/a\tb",
    "/%00",
    '/a"b<c>{d}|e^f`g\\h',
]
ODD_VERSIONS = ["HTTP/2.0", "HTTP/1.2", "http/1.1", "HTTP/1.1 ", "HTTP/0.9", "HTTP/11", "HTTP/1.10"]
TOKEN = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
CLEAN_NAMES = st.one_of(
    st.sampled_from(
        [
            "X-A",
            "X-B",
            "Accept",
            "Cookie",
            "Content-Type",
            "User-Agent",
            "Max-Forwards",
            "Content-Range",
            "Authorization",
            "Proxy-Authorization",
            "Proxy-Foo",
            "Keep-Alive",
            "TE",
            "Trailer",
            "Upgrade",
            "Expect",
            "X-Request-Id",
            "x-ms-client-request-id",
            "azureml-model-deployment",
        ]
    ),
    st.text(alphabet=TOKEN, min_size=1, max_size=10),
)
ODD_NAMES = ["X Y", "", "X\x00", "X\x80", "X(", "Transfer-Encoding ", " X-Lead", "X\x7f"]
CLEAN_VALUES = st.one_of(
    st.sampled_from(["v", "a b", "", "trailers", "h2c", "100-continue", "1", "abc-123", "gzip, br", "\x80\xff"]),
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=24),
)
ODD_VALUES = [
    " lead",
    "trail \t",
    "a\x01b",
    "a\x7fb",
    "a\rb",
    "a\nb",
    "a\x00b",
    "a\x0bb",
    "folded\r\n continued",
    "folded\r\n\tcontinued",
    "x" * 9000,
    "a" * 201,
    "id with space",
]
CLEAN_CONNECTION: list[str | None] = [None] * 6 + [
    "close",
    "keep-alive",
    "upgrade",
    "X-A",
    "TE, X-B",
    "Close",
    "upgrade, keep-alive",
]
ODD_CONNECTION: list[str | None] = [
    "close, keep-alive",
    "keep-alive, close",
    "content-length",
    "transfer-encoding",
    ",",
    "close,,x",
]
SMUGGLED = [
    b"0\r\n\r\n",
    b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\r\n\r\nGET /s HTTP/1.1\r\n\r\n",
    b"hello",
]
BODIES = st.one_of(st.just(b""), st.binary(max_size=48), st.sampled_from(SMUGGLED))
CHUNK_ODDITIES = ["more", "less", "huge", "neg", "ws", "ext", "ext-bws", "ext-bad", "lf", "no-crlf", "upper"]
CLEAN_TRAILERS = [b"X-Trailer: t\r\n", b"X-Other: u v\r\n"]
ODD_TRAILERS = [
    b"Content-Length: 5\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"X-T: a\x01b\r\n",
    b"X-T: folded\r\n more\r\n",
    b"X-T: bare\n",
    b"Bad Trailer\r\n",
]


T = TypeVar("T")


class Odds:
    """How odd one request or answer is: each of its parts is drawn from the odd choices with probability
    `percent`, until `most` parts are odd; the rest are clean. Few odd parts at a time keep each oddity visible
    (not hidden behind another that the proxy refuses first) and make failures shrink to one."""

    def __init__(self, draw: st.DrawFn, most: int, percent: int = 15) -> None:
        self.draw = draw
        self.most = most
        self.percent = percent
        self.used = 0

    def __call__(self) -> bool:
        if self.used >= self.most or self.draw(st.integers(0, 99)) >= self.percent:
            return False
        self.used += 1
        return True

    def pick(self, clean: st.SearchStrategy[T] | list[T], odd: list[T]) -> T:
        if self():
            return self.draw(st.sampled_from(odd))
        strategy = st.sampled_from(clean) if isinstance(clean, list) else clean
        return self.draw(strategy)


# How many parts of a request or answer are odd at most (0: well formed).
ODDNESS = st.sampled_from([0, 0, 0, 1, 1, 1, 2, 4])


@st.composite
def chunked(draw: st.DrawFn, body: bytes, odds: Odds) -> bytes:
    """A chunked encoding of `body`, with odd sizes, extensions, line ends and trailers as `odds` has it."""
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(body) - 1)), max_size=3)))) if len(body) > 1 else []
    parts = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True) if b > a]
    out = b""
    for part in parts:
        size = b"%x" % len(part)
        data_end = b"\r\n"
        odd = draw(st.sampled_from(CHUNK_ODDITIES)) if odds() else "ok"
        if odd == "upper":
            size = draw(st.sampled_from([b"%X", b"0%x", b"00%X"])) % len(part)
        elif odd == "more":
            size = b"%x" % (len(part) + 1)
        elif odd == "less":
            size = b"%x" % max(0, len(part) - 1)
        elif odd == "huge":
            size = draw(st.sampled_from([b"ffffffffffffffffff", b"7fffffffffffffff", b"100000000"]))
        elif odd == "neg":
            size = b"-" + size
        elif odd == "ws":
            size += draw(st.sampled_from([b" ", b"\t", b" ;a=b"]))
        elif odd == "ext":
            size += draw(st.sampled_from([b";a=b", b";a", b';a="x y"', b";a=b;c=d"]))
        elif odd == "ext-bws":
            size += b" ; a = b"
        elif odd == "ext-bad":
            size += draw(st.sampled_from([b";", b";a=", b";a=b c", b";\x01", b';a="x', b";a=\x80"]))
        elif odd == "no-crlf":
            data_end = draw(st.sampled_from([b"", b"\n", b"XX"]))
        out += size + (b"\n" if odd == "lf" else b"\r\n") + part + data_end
    out += (draw(st.sampled_from([b"000", b"0;x=y"])) if odds() else b"0") + b"\r\n"
    for _ in range(draw(st.integers(0, 2))):
        out += draw(st.sampled_from(ODD_TRAILERS)) if odds() else draw(st.sampled_from(CLEAN_TRAILERS))
    out += draw(st.sampled_from([b"", b"\n"])) if odds() else b"\r\n"
    return out


@st.composite
def caller_request(draw: st.DrawFn) -> bytes:
    """One request: at hostility 0 well formed (if not always acceptable to the proxy: it may carry a dot segment,
    a credential, hop-by-hop headers, ...); otherwise with odd choices in any of its parts."""
    odds = Odds(draw, draw(ODDNESS))
    method = odds.pick(CLEAN_METHODS, ODD_METHODS).encode("latin-1")
    target = odds.pick(CLEAN_TARGETS, ODD_TARGETS).encode("utf-8")
    version = odds.pick(["HTTP/1.1"] * 4 + ["HTTP/1.0"], ODD_VERSIONS).encode()
    sp = draw(st.sampled_from([b"  ", b"\t"])) if odds() else b" "
    fields: list[bytes] = []
    host = odds.pick(["one"], ["none", "two", "same", "empty"])
    if host != "none" and (version != b"HTTP/1.0" or draw(st.booleans())):
        fields.append(b"Host: fuzz" if host != "empty" else b"Host:")
    if host in ("two", "same"):
        fields.append(b"Host: other" if host == "two" else b"Host: fuzz")
    for _ in range(draw(st.integers(0, 5))):
        name = odds.pick(CLEAN_NAMES, ODD_NAMES)
        sep = odds.pick([": "], [":", ":\t", " : ", ":  "])
        value = odds.pick(CLEAN_VALUES, ODD_VALUES)
        fields.append((name + sep + value).encode("utf-8"))
    connection = odds.pick(CLEAN_CONNECTION, ODD_CONNECTION) if draw(st.booleans()) else None
    if connection is not None:
        fields.append(b"Connection: " + connection.encode())
    if odds() and draw(st.integers(0, 3)) == 0:
        fields += [b"X-Many-%d: m" % i for i in range(45)]
    body = draw(BODIES)
    framing = odds.pick(
        ["none", "cl", "cl", "chunked", "chunked"], ["cl+te", "dup-cl", "te-odd", "cl-odd", "te-dup", "cl-big"]
    )
    encoded = body
    if framing == "none":
        encoded = b""
    elif framing == "cl":
        fields.append(b"Content-Length: %d" % len(body))
    elif framing == "dup-cl":
        fields += [b"Content-Length: %d" % len(body)] * 2
    elif framing == "cl-odd":
        n = len(body)
        fields.append(
            b"Content-Length: "
            + draw(st.sampled_from([b"0%d" % n, b"+%d" % n, b"%d, %d" % (n, n), b"%d,%d" % (n, n + 1), b"-1", b"0x1"]))
        )
    elif framing == "cl-big":
        fields.append(b"Content-Length: " + draw(st.sampled_from([b"70000", b"99999999999999999999999", b"65536"])))
    else:
        encoded = draw(chunked(body, odds))
        te = b"chunked"
        if framing == "te-odd":
            te = draw(
                st.sampled_from(
                    [
                        b"Chunked",
                        b" chunked ",
                        b"gzip, chunked",
                        b"chunked, gzip",
                        b"identity",
                        b"xchunked",
                        b"chunked;q=1",
                    ]
                )
            )
        fields.append(b"Transfer-Encoding: " + te)
        if framing == "te-dup":
            fields.append(b"Transfer-Encoding: chunked")
        if framing == "cl+te":
            fields.append(b"Content-Length: %d" % len(body))
    order = draw(st.permutations(range(len(fields))))
    fields = [fields[i] for i in order]
    eols = [b"\n" if odds() and draw(st.integers(0, 3)) == 0 else b"\r\n" for _ in range(len(fields) + 2)]
    head = method + sp + target + b" " + version + eols[0]
    for line, eol in zip(fields, eols[1:], strict=False):
        head += line + eol
    return head + eols[-1] + encoded


# Classic shapes of request smuggling and proxy abuse, mixed into the random streams now and then so that each
# shows up on its own in a short run (the random parts find their variations).
CLASSIC_REQUESTS = [
    b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"POST /c HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /c HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n0\r\n\r\n",
    b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\tchunked\r\n\r\n0\r\n\r\n",
    b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0000000000000000003\r\nabc\r\n0\r\n\r\n",
    b'POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;x="a\r\nb"\r\nabc\r\n0\r\n\r\n',
    b"POST /c HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"GET /c HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n",
    b"GET /c HTTP/1.1\nHost: a\n\n",
    b"TRACE /c HTTP/1.1\r\nHost: a\r\n\r\n",
    b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
    b"GET http://evil.example/c HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /c/%2e%2e/d HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /c HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 3\r\n\r\nabc",
    b"POST /c HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: h2c\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\n",
    b"POST /c HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
    b"GET /c HTTP/1.1\r\nHost: a\r\nConnection: close, keep-alive\r\n\r\n",
    b"GET /c HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"GET /c HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n",
    b"HEAD /c HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET  /c HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /c HTTP/1.1\r\nHost: a\r\nx-request-id: id \r\n\r\n",
]


@st.composite
def caller_cases(draw: st.DrawFn) -> CallerCase:
    one = st.one_of(caller_request(), caller_request(), caller_request(), st.sampled_from(CLASSIC_REQUESTS))
    requests = draw(st.lists(one, min_size=1, max_size=4))
    stream = b"".join(requests)
    if draw(st.integers(0, 12)) == 0:
        stream = b"\r\n" + stream
    if draw(st.integers(0, 10)) == 0:
        stream = stream[: draw(st.integers(1, len(stream)))]  # the bytes end in the middle of something
    flood = 0
    if draw(st.integers(0, 30)) == 0:
        stream += b"GET /flood HTTP/1.1\r\nHost: fuzz\r\nX-Flood: "
        flood = CALLER_FLOOD
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=4))))
    return CallerCase(stream, cuts, flood, draw(st.integers(0, 9)) == 0)


def run_caller_case(rig: Rig, case: CallerCase) -> None:
    """One caller-side conversation and every invariant on it."""
    stream = case.stream
    # A flood never ends its header line (h11 refuses it once its receive buffer passes 16 KiB), unless an earlier
    # request's Content-Length takes it as body: h11 reads all of it, as the proxy does.
    plan, rest = plan_requests(stream + b"a" * case.flood)
    last = plan[-1] if plan else None
    open_after = (
        last is not None
        and last.outcome == "accepted"
        and last.keep_alive
        and not any(r.must and r.closes for r in last.rules)
        and not rest
        and not case.flood
        and not case.half_close
    )
    if open_after:
        # The connection is open and idle after the last request: one more that closes it ends the conversation.
        stream += SENTINEL
        plan, rest = plan_requests(stream)
        last = plan[-1]
    bounds = [0, *case.cuts, len(stream)]
    pieces = [stream[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    # Otherwise half-close once every answer the plan is sure of is in (all of them when the last request is
    # whole, and the proxy then has a moment to show whether it reads on), or at once to test an early close.
    sure = len(plan) if last is not None and last.outcome == "accepted" else max(0, len(plan) - 1)
    before = len(rig.recorded)
    faults_before = len(rig.upstream_faults)
    errors_before = len(rig.errors)
    rss_before = rss_bytes()
    resettable = reset_peak()
    started = time.monotonic()
    conv = converse(
        rig.caller_port,
        pieces,
        flood=case.flood,
        half_close=not open_after,
        wait_for=None if case.half_close else (lambda got: complete_answers(got, plan) >= sure),
    )
    rig.settle()
    elapsed = time.monotonic() - started
    peak = max(conv.peak_rss, peak_rss_bytes() if resettable else 0)
    rss_after = rss_bytes()
    rig.caller_cases += 1
    problems = check_caller_case(rig, plan, conv, rig.recorded[before:], rig.upstream_faults[faults_before:])
    problems += [f"proxy logged: {r.getMessage()}" for r in rig.errors[errors_before:]]
    if elapsed > CASE_SECONDS + 1:
        problems.append(f"the case took {elapsed:.1f} s")
    if peak - rss_before > RSS_GROWTH_BOUND or rss_after - rss_before > RSS_GROWTH_BOUND:
        problems.append(
            f"RSS grew by {(peak - rss_before) >> 10} KiB at peak, {(rss_after - rss_before) >> 10} KiB after"
        )
    tally(f"caller: {plan[0].outcome if plan else 'empty'}, {len(plan)} requests")
    assert not problems, "\n".join([f"stream {stream!r} cut at {case.cuts}", *problems])


@FUZZ
@given(case=caller_cases())
@example(  # found by make fuzz: a flood that an earlier request's Content-Length takes as its body
    case=CallerCase(
        b"\r\nGET /score HTTP/1.1\r\nHost: fuzz\r\nX-A: v\r\nContent-Length: 65536\r\n\r\n"
        b"GET /flood HTTP/1.1\r\nHost: fuzz\r\nX-Flood: ",
        cuts=[],
        flood=CALLER_FLOOD,
        half_close=True,
    )
)
def test_caller_byte_streams_reach_the_upstream_exactly_as_h11_reads_them(rig: Rig, case: CallerCase) -> None:
    run_caller_case(rig, case)


# -- the upstream side: answer byte streams from a scripted upstream


@dataclass
class Exchange:
    """One request through the proxy and the bytes the scripted upstream answers it with."""

    method: str
    body: bytes
    answer: bytes  # "{case}" is replaced by the request's X-Case
    cuts: list[int]  # split points of the answer (those at or past the end of the answer h11 reads are dropped)
    delays: list[float]  # seconds before each piece
    end: str  # "keep", "close" (after the bytes), "stall"
    flood: int = 0  # bytes of b"a" after the answer bytes, which end inside a line (an endless header or trailer)
    plain: bool = False  # nothing odd: the proxy must relay it whole


@dataclass
class UpstreamCase:
    exchanges: list[Exchange]
    fin: str = ""  # the caller half-closes after the last request ("request") or its answer's head ("head")


UPSTREAM_FLOOD = 8 << 20
CLEAN_STATUSES = ["200"] * 4 + ["201", "202", "206", "301", "403", "404", "500", "503", "204", "304"]
ODD_STATUSES = ["999", "600", "000", "20", "2000", "099", "100", "101"]
CLEAN_INTERIM = ["100", "102", "103"]
ODD_INTERIM = ["199", "101", "150", "000", "099", "1000"]
CLEAN_RESPONSE_NAMES = st.sampled_from(
    [
        *("X-A", "X-B", "Content-Type", "Set-Cookie", "Cache-Control", "Date", "Server", "ETag", "Vary"),
        *("x-request-id", "Proxy-Foo", "Keep-Alive", "Trailer", "Upgrade", "TE", "Location"),
    ]
)
ODD_RESPONSE_NAMES = ["X Y", "X\x00", "X(", " X-Lead", "Content-Length ", "X\x80"]
CLEAN_RESPONSE_VALUES = st.one_of(
    st.sampled_from(["v", "a b", "", "text/plain", "Fri, 04 Dec 2026 00:00:00 GMT", "\x80\xff"]),
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20),
)
ODD_RESPONSE_VALUES = ["a\x01b", "a\rb", "a\x00b", "folded\r\n more", "trail \t", "a\x7fb", "{long}"]
CLEAN_RESPONSE_CONNECTION: list[str | None] = [None] * 6 + ["keep-alive", "close", "X-A", "X-B, Keep-Alive"]
ODD_RESPONSE_CONNECTION: list[str | None] = [
    "Content-Length",
    "Transfer-Encoding",
    "Date",
    "Content-Type, Content-Length",
]
ODD_RESPONSE_CONNECTION += ["close, keep-alive"]
EXTRAS = [b"XYZ", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra", b"\r\n", b"0\r\n\r\n", b"\x00"]
ANSWER_FRAMINGS = ["cl", "cl", "chunked", "chunked", "none"]
ODD_ANSWER_FRAMINGS = ["cl+te", "dup-cl", "dup-cl-diff", "cl-list", "cl-more", "cl-less", "cl-bad", "te-dup"]
ODD_ANSWER_FRAMINGS += ["te-gzip", "te-chunked-gzip", "te-identity"]
# Placeholders in an answer's bytes, expanded when it is sent (hypothesis shows the short form).
BIG, LONG = 200_000, 70_000
PLACEHOLDERS = {b"{big}": b"b" * BIG, b"{long}": b"x" * LONG}


def expand(data: bytes, case: str) -> bytes:
    for token, value in PLACEHOLDERS.items():
        data = data.replace(token, value)
    return data.replace(b"{case}", case.encode())


@st.composite
def answer_chunked(draw: st.DrawFn, body: bytes, odds: Odds) -> bytes:
    """The chunked encoding of an answer's body, with odd sizes, extensions, line ends and trailers."""
    if body == b"{big}" or len(body) < 2:
        parts = [body] if body else []
    else:
        cuts = sorted(set(draw(st.lists(st.integers(1, len(body) - 1), max_size=3))))
        parts = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True) if b > a]
    out = b""
    for part in parts:
        length = BIG if part == b"{big}" else len(part)
        size = b"%x" % length
        if odds():
            size = draw(
                st.sampled_from([b"%X" % length, b"0" + size, size + b";e=1", size + b" ", b"%x" % (length + 1)])
            )
        out += size + b"\r\n" + part + (draw(st.sampled_from([b"", b"\n", b"XX"])) if odds() else b"\r\n")
    out += b"0\r\n"
    for _ in range(draw(st.integers(0, 2))):
        out += draw(st.sampled_from(ODD_TRAILERS)) if odds() else draw(st.sampled_from(CLEAN_TRAILERS))
    return out + (draw(st.sampled_from([b"", b"\n"])) if odds() else b"\r\n")


@st.composite
def interim_answers(draw: st.DrawFn, odds: Odds) -> bytes:
    out = b""
    for _ in range(draw(st.integers(1, 2))):
        out += b"HTTP/1.1 " + odds.pick(CLEAN_INTERIM, ODD_INTERIM).encode() + b" Interim\r\n"
        shape = odds.pick(["none"], ["length", "chunked", "header"])
        if shape == "length":
            size = draw(st.sampled_from([0, 5, 42]))
            out += b"Content-Length: %d\r\n\r\n" % size + b"i" * size
        elif shape == "chunked":
            out += b"Transfer-Encoding: chunked\r\n\r\n5\r\niiiii\r\n0\r\n\r\n"
        else:
            out += (b"X-Interim: 1\r\n" if shape == "header" else b"") + b"\r\n"
    return out


@st.composite
def exchanges(draw: st.DrawFn) -> Exchange:
    """A request and an answer to it: at hostility 0 a well-formed answer, else odd in any of its parts."""
    odds = Odds(draw, draw(ODDNESS))
    method = draw(st.sampled_from(["GET", "GET", "POST", "HEAD", "PUT", "DELETE"]))
    request_body = b"payload" if method in ("POST", "PUT") else b""
    answer = draw(interim_answers(odds)) if draw(st.integers(0, 4)) == 0 or odds() else b""
    version = odds.pick(["HTTP/1.1"] * 5 + ["HTTP/1.0"], ["HTTP/2", "HTTP/1.2", "http/1.1", "HTTP/1.1 "])
    status = odds.pick(CLEAN_STATUSES, ODD_STATUSES)
    reason = odds.pick(["OK", "", "Whatever Text"], [" spaced ", "\x80\xff", "bad\x01", "a\rb"])
    answer += f"{version} {status}".encode() + (b" " + reason.encode("latin-1") if reason else b"") + b"\r\n"
    fields = [b"X-Script: {case}"]
    for _ in range(draw(st.integers(0, 4))):
        name = odds.pick(CLEAN_RESPONSE_NAMES, ODD_RESPONSE_NAMES)
        value = odds.pick(CLEAN_RESPONSE_VALUES, ODD_RESPONSE_VALUES)
        fields.append(f"{name}: {value}".encode("latin-1"))
    connection = odds.pick(CLEAN_RESPONSE_CONNECTION, ODD_RESPONSE_CONNECTION)
    if connection is not None:
        fields.append(b"Connection: " + connection.encode())
    flood = draw(st.sampled_from(["head", "trailer", "ext"])) if odds() and draw(st.integers(0, 5)) == 0 else ""
    bodyless = method == "HEAD" or status in ("204", "304")
    send_body = not bodyless or odds()  # a body on a HEAD, 204 or 304 answer is odd
    body = draw(st.binary(max_size=48)) if draw(st.integers(0, 25)) else b"{big}"  # a big one pauses reading
    framing = "chunked" if flood in ("trailer", "ext") else odds.pick(ANSWER_FRAMINGS, ODD_ANSWER_FRAMINGS)
    no_framing_headers = status in ("204", "304") and not send_body
    n = BIG if body == b"{big}" else len(body)
    encoded = body
    if framing.startswith("cl") or framing.startswith("dup-cl"):
        length = {"cl-more": b"%d" % (n + 7), "cl-less": b"%d" % max(0, n - 1), "cl-list": b"%d, %d" % (n, n)}.get(
            framing, b"%d" % n
        )
        if framing == "cl-bad":
            length = draw(st.sampled_from([b"+%d" % n, b"-1", b"0x%x" % n, b"%d x" % n]))
        if not no_framing_headers:
            fields.append(b"Content-Length: " + length)
            if framing == "dup-cl":
                fields.append(b"Content-Length: " + length)
            if framing == "dup-cl-diff":
                fields.append(b"Content-Length: %d" % (n + 1))
    if framing in ("chunked", "cl+te", "te-dup") or framing.startswith("te-"):
        te = {"te-gzip": b"gzip", "te-chunked-gzip": b"chunked, gzip", "te-identity": b"identity"}.get(
            framing, b"chunked"
        )
        if not no_framing_headers:
            fields.append(b"Transfer-Encoding: " + te)
            if framing == "te-dup":
                fields.append(b"Transfer-Encoding: chunked")
        if te == b"chunked" and not flood:
            encoded = draw(answer_chunked(body, odds))
    order = draw(st.permutations(range(len(fields))))
    answer += b"".join(fields[i] + b"\r\n" for i in order)
    if flood == "head":
        answer += b"X-Flood: "  # the head never ends
    elif flood:
        answer += b"\r\n" + (b"0\r\nX-Flood: " if flood == "trailer" else b"5;e=")  # a trailer or extension
    else:
        answer += b"\r\n" + (encoded if send_body else b"")
        answer += draw(st.sampled_from(EXTRAS)) if odds() else b""
    end = odds.pick(["keep"] * 4 + ["close"], ["stall", "cut"])
    if framing == "none" and end == "keep" and not odds():
        end = "close"  # the body ends with the connection
    if end == "cut":
        answer = answer[: draw(st.integers(0, len(answer)))]
        end = "close"
    if flood:
        end = "close"
    cuts = draw(st.lists(st.integers(1, max(1, len(answer) - 1)), max_size=3))
    pieces = len(set(cuts)) + 1
    delays = draw(st.lists(st.sampled_from([0.0, 0.0, 0.001, 0.005, 0.02]), min_size=pieces, max_size=pieces))
    size = UPSTREAM_FLOOD if flood else 0
    return Exchange(method, request_body, answer, cuts, delays, end, size, plain=odds.used == 0)


# Classic shapes of answers that desynchronise a proxy, mixed in now and then (as CLASSIC_REQUESTS above).
_OK = b"HTTP/1.1 200 OK\r\nX-Script: {case}\r\n"  # an answer's start: the X-Script marker tells relayed answers
_FINAL = _OK + b"Content-Length: 2\r\n\r\nok"
_CHUNKED_OK = b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
CLASSIC_ANSWERS = [
    b"HTTP/1.1 199 X\r\nContent-Length: 42\r\n\r\n" + b"i" * 42 + _FINAL,
    b"HTTP/1.1 000 Zero\r\nContent-Length: 0\r\n\r\n" + _FINAL,
    b"HTTP/1.1 100 Continue\r\nContent-Length: 5\r\n\r\nhello" + _FINAL,
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n" + _FINAL,
    _OK + b"Connection: Content-Length\r\nContent-Length: 5\r\n\r\nhello",
    _OK + b"Connection: Transfer-Encoding\r\n" + _CHUNKED_OK,
    _OK + b"Content-Length: 2\r\n" + _CHUNKED_OK,
    _OK + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\nokk",
    _OK + b"Transfer-Encoding: gzip\r\n\r\n\x1f\x8b\x08\x00",
    _FINAL + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra",
    _FINAL + b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\nX-Script: {case}\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 304 Not Modified\r\nX-Script: {case}\r\n" + _CHUNKED_OK,
    b"HTTP/1.0 200 OK\r\nX-Script: {case}\r\nConnection: keep-alive\r\n" + _CHUNKED_OK,
    b"HTTP/1.0 200 OK\r\nX-Script: {case}\r\nConnection: close, keep-alive\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.0 200 OK\r\nX-Script: {case}\r\nContent-Length: 2\r\n\r\nok",
    _OK + b"Connection: close\r\nContent-Length: 2\r\n\r\nok",
    _OK + b"X-A: b\r\n c\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\nX-Script: {case}\nContent-Length: 2\n\nok",
    _OK + b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-T: t\r\n\r\n",
    _OK + b"X-Big: {long}\r\nContent-Length: 2\r\n\r\nok",
]


# Answers that end inside a line that never ends: a head, a chunk extension, a trailer (UPSTREAM_FLOOD bytes).
CLASSIC_FLOODS = [
    b"HTTP/1.1 200 OK\r\nX-Script: {case}\r\nX-Flood: ",
    b"HTTP/1.1 200 OK\r\nX-Script: {case}\r\nTransfer-Encoding: chunked\r\n\r\n2;e=",
    b"HTTP/1.1 200 OK\r\nX-Script: {case}\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-Flood: ",
]


@st.composite
def classic_exchanges(draw: st.DrawFn) -> Exchange:
    method = draw(st.sampled_from(["GET", "GET", "POST", "HEAD"]))
    body = b"payload" if method == "POST" else b""
    if draw(st.integers(0, 5)) == 0:
        flood = draw(st.sampled_from(CLASSIC_FLOODS))
        return Exchange(method, body, flood, cuts=[], delays=[0.0], end="close", flood=UPSTREAM_FLOOD)
    end = draw(st.sampled_from(["keep", "keep", "close"]))
    return Exchange(method, body, draw(st.sampled_from(CLASSIC_ANSWERS)), cuts=[], delays=[0.0], end=end)


@st.composite
def upstream_cases(draw: st.DrawFn) -> UpstreamCase:
    one = st.one_of(exchanges(), exchanges(), exchanges(), classic_exchanges())
    fin = draw(st.sampled_from(["", "", "", "", "request", "head"]))
    return UpstreamCase(draw(st.lists(one, min_size=1, max_size=3)), fin)


def endless(method: str, verdict: Verdict) -> bool:
    """The proxy relays the answer as one without an end of its own (no Content-Length): a FIN from the caller
    during it is a hang-up (README), not a half-close."""
    if method == "HEAD" or verdict.status in (204, 304):
        return False
    return not any(n.lower() == b"content-length" for n, _ in verdict.headers)


def run_upstream_case(rig: Rig, case: UpstreamCase) -> None:
    """The exchanges of one case, in order on one caller connection (a new one after a cut), and every invariant."""
    rig.upstream_cases += 1
    rig.exchanges += len(case.exchanges)
    prefix = f"u{rig.upstream_cases}"
    plans = []
    for i, ex in enumerate(case.exchanges):
        cid = f"{prefix}-{i}"
        data = expand(ex.answer, cid)
        closes = ex.end == "close" and not ex.flood
        probe = b"a" * 20000 if ex.flood else b""
        verdict = judge_answer(ex.method.encode(), ex.body, data + probe, closes=closes)
        end = "keep" if ex.end == "stall" and verdict.outcome == "clean" else ex.end  # nothing left to stall
        clean_end = verdict.used if verdict.outcome == "clean" else len(data)
        bounds = [0, *sorted({c for c in ex.cuts if 0 < c < clean_end}), len(data)]
        pieces = [data[a:b] for a, b in itertools.pairwise(bounds)]
        delays = (ex.delays + [0.0] * len(pieces))[: len(pieces)]
        reusable = verdict.reusable and end == "keep" and not ex.flood
        rig.scripts[cid] = Script(pieces, delays, end, flood=ex.flood, reusable=reusable)
        plans.append((cid, ex, verdict))
    late_before = {c.id: len(c.late) for c in rig.upstream_conns}
    arrivals_before = len(rig.arrivals)
    errors_before = len(rig.errors)
    faults_before = len(rig.upstream_faults)
    rss_before = rss_bytes()
    resettable = reset_peak()
    caller = Caller(rig.script_port)
    problems: list[str] = []
    try:
        for n, (cid, ex, verdict) in enumerate(plans, 1):
            request = f"{ex.method} /up/{cid} HTTP/1.1\r\nHost: fuzz\r\nX-Case: {cid}\r\n".encode()
            request += b"Content-Length: %d\r\n\r\n" % len(ex.body) + ex.body if ex.body else b"\r\n"
            fin = case.fin if n == len(plans) else ""
            started = time.monotonic()
            reused = caller.sock is not None
            answer, ended, rest = caller.ask(request, ex.method.encode(), TOTAL_TIMEOUT + 2, fin)
            if reused and not answer.raw and ended in ("eof", "reset"):
                # The proxy had closed the kept-alive connection: a client retries on a new one (RFC 9112 9.3.1).
                rig.scripts[cid + "r"] = rig.scripts[cid]
                request = request.replace(cid.encode(), cid.encode() + b"r")
                answer, ended, rest = caller.ask(request, ex.method.encode(), TOTAL_TIMEOUT + 2, fin)
            elapsed = time.monotonic() - started
            # Listed exception: a caller's FIN during an answer without a length is its hang-up (the proxy may cut
            # the answer or give none); with a length it is a half-close, and the whole answer still comes.
            plain = ex.plain and not (fin and endless(ex.method, verdict))
            problems += check_upstream_answer(cid, ex.method.encode(), verdict, answer, plain)
            if fin and ended == "answer" and not caller.closed_within(2):
                problems.append(f"{cid}: the caller half-closed, and the connection stayed open after the answer")
            if fin:
                kind = "no length" if endless(ex.method, verdict) else "a length or no body"
                tally(
                    f"upstream: caller FIN after the {fin}, answer with {kind}: {'whole' if answer.complete else 'cut'}"
                )
            if ended == "too long":
                problems.append(f"{cid}: the answer ran past {CALLER_HOLDS} bytes: {answer.raw[:200]!r}")
            if ended == "deadline":
                problems.append(f"{cid}: no answer and no close within {elapsed:.1f} s: {answer.raw[:200]!r}")
            elif elapsed > TOTAL_TIMEOUT + 1:
                problems.append(f"{cid}: the answer took {elapsed:.1f} s, past timeouts.total")
            if rest:
                problems.append(f"{cid}: bytes after the answer: {rest[:200]!r}")
            tally(f"upstream: {verdict.outcome}, caller got {answer.status or ended}")
    finally:
        caller.close()
    rig.settle()
    rig.empty_pool()
    peak = max(caller.peak_rss, peak_rss_bytes() if resettable else 0)
    rss_after = rss_bytes()
    for cid, _, _ in plans:
        rig.scripts.pop(cid, None)
        rig.scripts.pop(cid + "r", None)
    late = [c for c in rig.upstream_conns if len(c.late) > late_before.get(c.id, 0)]
    idempotent = {cid: ex.method in ("GET", "HEAD", "PUT", "DELETE") for cid, ex, _ in plans}
    problems += check_pool(rig, late, rig.arrivals[arrivals_before:], idempotent)
    problems += [f"upstream: {f}" for f in rig.upstream_faults[faults_before:]]
    problems += [f"proxy logged: {r.getMessage()}" for r in rig.errors[errors_before:]]
    if peak - rss_before > RSS_GROWTH_BOUND or rss_after - rss_before > RSS_GROWTH_BOUND:
        problems.append(
            f"RSS grew by {(peak - rss_before) >> 10} KiB at peak, {(rss_after - rss_before) >> 10} KiB after"
        )
    if problems:
        shown = [f"{cid}: {ex.method} -> {rig_script(ex)}" for cid, ex, _ in plans]
        raise AssertionError("\n".join([*shown, *problems]))


def rig_script(ex: Exchange) -> str:
    flood = f" + {ex.flood} bytes of b'a'" if ex.flood else ""
    return f"{ex.answer!r}{flood} in pieces cut at {ex.cuts}, then {ex.end}"


@FUZZ
@given(case=upstream_cases())
def test_upstream_answers_reach_the_caller_as_h11_reads_them_or_fail_cleanly(rig: Rig, case: UpstreamCase) -> None:
    run_upstream_case(rig, case)


# -- regressions: each failure the fuzzer found, shrunk, with its exact bytes (they hold the same invariants)


def caller_case(stream: bytes) -> CallerCase:
    return CallerCase(stream, cuts=[])


def one_answer(method: str, answer: bytes, end: str = "keep", flood: int = 0) -> UpstreamCase:
    body = b"payload" if method in ("POST", "PUT") else b""
    return UpstreamCase([Exchange(method, body, answer, cuts=[], delays=[0.0], end=end, flood=flood)])


# A whole 200, its connection reusable.
OK_ANSWER = b"HTTP/1.1 200 OK\r\nX-Script: {case}\r\nContent-Length: 2\r\n\r\nok"


def then_ok(case: UpstreamCase) -> UpstreamCase:
    """`case`, then a GET answered with OK_ANSWER: whether it goes out on the same upstream connection."""
    case.exchanges += one_answer("GET", OK_ANSWER).exchanges
    return case


def test_regression_a_transfer_encoding_not_exactly_chunked_is_refused(rig: Rig) -> None:
    """Found: the server took `gzip, chunked` (llhttp takes any list ending in chunked) and forwarded the body
    without its gzip coding. h11 refuses it (501); so must the proxy."""
    run_caller_case(
        rig, caller_case(b"POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n")
    )


def test_regression_trace_is_refused(rig: Rig) -> None:
    """Found: TRACE was forwarded, and the upstream would echo the injected credential back to the caller."""
    run_caller_case(rig, caller_case(b"TRACE /a HTTP/1.1\r\nHost: a\r\n\r\n"))


def test_regression_a_refused_head_request_gets_no_body(rig: Rig) -> None:
    """Found: a HEAD request the parser refuses got the JSON error body after the head (a HEAD answer has none:
    those bytes belong to no answer)."""
    run_caller_case(rig, caller_case(b"HEAD /a HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"))
    run_caller_case(rig, caller_case(b"HEAD /a HTTP/1.1\r\nHost: a\r\nX: \x01\r\n\r\n"))  # refused by llhttp itself
    run_caller_case(rig, caller_case(b"HEAD /a HTTP/1.1\nHost: a\n\n"))


def test_regression_a_request_line_with_doubled_spaces_reaches_the_upstream_with_single_ones(rig: Rig) -> None:
    """Found: llhttp takes `GET  /a` and `GET /a  HTTP/1.1`, which h11 refuses. RFC 9112 3 lets a recipient parse
    on whitespace boundaries; the proxy writes the request line anew with single spaces, so the upstream reads it
    as h11 reads the line with single spaces (a listed exception: refusing would do too)."""
    run_caller_case(rig, caller_case(b"GET  /a HTTP/1.1\r\nHost: a\r\n\r\n"))
    run_caller_case(rig, caller_case(b"GET /a  HTTP/1.1\r\nHost: a\r\n\r\n"))


def test_regression_http10_with_transfer_encoding_closes_the_connection(rig: Rig) -> None:
    """Found: an HTTP/1.0 keep-alive request with Transfer-Encoding kept the connection open and the next request
    was forwarded; RFC 9112 6.1: the framing is faulty and the connection MUST close after the request."""
    stream = (
        b"POST /a HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    run_caller_case(rig, caller_case(stream))


def test_regression_an_unknown_interim_answer_with_a_body_is_not_relayed(rig: Rig) -> None:
    """Found: the body of an upstream `199` (llhttp reads a body for any 1xx but 100, 102 and 103) was passed to
    the caller ahead of the final answer's body. A 1xx has no body (RFC 9112 6.3): h11 reads the 42 bytes as the
    next answer and refuses them."""
    answer = b"HTTP/1.1 199 X\r\nContent-Length: 42\r\n\r\n" + b"i" * 42
    run_upstream_case(rig, one_answer("GET", answer + OK_ANSWER))


def test_regression_an_unknown_interim_answer_with_a_chunked_body_is_not_relayed(rig: Rig) -> None:
    answer = b"HTTP/1.1 199 Interim\r\nTransfer-Encoding: chunked\r\n\r\n5\r\niiiii\r\n0\r\n\r\n"
    run_upstream_case(rig, one_answer("GET", answer + OK_ANSWER))


def test_regression_connection_naming_content_length_keeps_the_framing(rig: Rig) -> None:
    """Found: `Connection: Content-Length` made the proxy drop the answer's Content-Length and add no framing of
    its own: the caller got a keep-alive 200 with neither Content-Length nor chunked."""
    answer = b"HTTP/1.1 200 OK\r\nX-Script: {case}\r\nConnection: Content-Length\r\nContent-Length: 5\r\n\r\nhello"
    run_upstream_case(rig, one_answer("GET", answer))


def test_regression_status_000_is_not_an_interim_answer(rig: Rig) -> None:
    """Found: status 000 (below 100) was taken as an interim answer and the next answer relayed; h11 refuses it."""
    answer = b"HTTP/1.1 000 Interim\r\nContent-Length: 0\r\n\r\n"
    run_upstream_case(rig, one_answer("GET", answer + OK_ANSWER))


def test_regression_endless_trailers_do_not_grow_memory(rig: Rig) -> None:
    """Found: a trailer line that never ends was kept in memory as it came (8 MiB here); the RSS bound caught it."""
    answer = b"HTTP/1.1 200 OK\r\nX-Script: {case}\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-Flood: "
    run_upstream_case(rig, one_answer("GET", answer, end="close", flood=UPSTREAM_FLOOD))


def test_regression_an_upstream_transfer_encoding_other_than_chunked_is_not_relayed(rig: Rig) -> None:
    """Found: an answer with `Transfer-Encoding: gzip` (or `chunked, gzip`, or two Transfer-Encoding headers) was
    relayed with that header dropped as hop-by-hop, so the caller got transfer-coded bytes as the body (with
    gzip, as a complete answer once the upstream closed). h11 refuses such an answer: the proxy must answer 502."""
    head = b"HTTP/1.1 200 OK\r\nX-Script: {case}\r\n"
    run_upstream_case(rig, one_answer("GET", head + b"Transfer-Encoding: gzip\r\n\r\n\x1f\x8b\x08\x00", end="close"))
    run_upstream_case(
        rig, one_answer("GET", head + b"Transfer-Encoding: chunked, gzip\r\n\r\n4\r\n\x1f\x8b\x08\x00\r\n")
    )
    doubled = b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    run_upstream_case(rig, one_answer("GET", head + doubled))


def test_regression_an_http10_answer_with_transfer_encoding_ends_its_connection(rig: Rig) -> None:
    """Found: after an HTTP/1.0 keep-alive answer framed with Transfer-Encoding the upstream connection went back to
    the pool and carried the next request; RFC 9112 6.1: such framing is faulty and the connection MUST close."""
    first = b"HTTP/1.0 200 OK\r\nX-Script: {case}\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
    first += b"2\r\nok\r\n0\r\n\r\n"
    run_upstream_case(rig, then_ok(one_answer("GET", first)))


def test_regression_a_request_id_with_trailing_whitespace_is_used_without_it(rig: Rig) -> None:
    """Found: `x-ms-client-request-id: abc ` was refused as an unusable request id: llhttp keeps the trailing
    whitespace, which is not part of the field value (RFC 9110 5.5); h11 reads `abc`."""
    run_caller_case(rig, caller_case(b"GET /a HTTP/1.1\r\nHost: a\r\nx-ms-client-request-id: abc \r\n\r\n"))


def test_regression_http10_close_wins_over_keep_alive(rig: Rig) -> None:
    """Found: an HTTP/1.0 request with `Connection: keep-alive, close` kept the connection open and the next request
    was read and forwarded (llhttp honours keep-alive for HTTP/1.0 whatever else is listed); RFC 9112 9.3: with
    close the connection does not persist."""
    run_caller_case(
        rig, caller_case(b"GET /a HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n")
    )


def test_regression_an_http10_answer_saying_close_ends_its_connection(rig: Rig) -> None:
    """Found: the same on the upstream side: after an HTTP/1.0 answer with `Connection: close, keep-alive` the
    connection went back to the pool and carried the next request."""
    first = b"HTTP/1.0 200 OK\r\nX-Script: {case}\r\nConnection: close, keep-alive\r\nContent-Length: 2\r\n\r\nok"
    run_upstream_case(rig, then_ok(one_answer("GET", first)))


def test_regression_an_upstream_head_over_64_kib_is_not_relayed(rig: Rig) -> None:
    """Found: a 70 KB answer head that arrived in one or two reads was relayed: the 64 KiB bound was checked only
    while the head was unfinished after a read (README: a head over 64 KiB gets 502)."""
    answer = b"HTTP/1.1 200 OK\r\nX-Script: {case}\r\nX-Big: {long}\r\nContent-Length: 2\r\n\r\nok"
    run_upstream_case(rig, one_answer("GET", answer))


def test_regression_no_request_is_forwarded_after_the_connection_is_doomed(rig: Rig) -> None:
    """Found: when a later pipelined request broke its chunked framing (so the connection was to close) while an
    earlier one was answered at once by the proxy itself, the request between them was still sent upstream (a
    POST, acted on) and its answer dropped: the caller got only the 400 with Connection: close."""
    stream = (
        b"GET /a/../b HTTP/1.1\r\nHost: a\r\n\r\n"
        b"POST /s HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi"
        b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    )
    run_caller_case(rig, caller_case(stream))


def test_regression_a_head_answer_naming_a_coding_is_relayed_without_it(rig: Rig) -> None:
    """Found by `make fuzz`: a HEAD answer with `Transfer-Encoding: gzip` (what a GET would get; RFC 9110 9.3.2) was
    relayed, as it should be, while h11 refuses any coding but chunked: the oracle reads it as chunked now. An
    HTTP/1.0 HEAD answer with Transfer-Encoding still ends its connection (RFC 9112 6.1)."""
    head = b"HTTP/1.1 200 OK\r\nX-Script: {case}\r\nTransfer-Encoding: gzip\r\n\r\n"
    run_upstream_case(rig, then_ok(one_answer("HEAD", head)))
    old = b"HTTP/1.0 200 OK\r\nX-Script: {case}\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
    run_upstream_case(rig, then_ok(one_answer("HEAD", old)))
