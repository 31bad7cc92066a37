"""What an attacker sends: credentials of any bytes, forged log lines, sign-in forms that
are huge or never finished, sign-outs from other sites, and short keys.

Requests an HTTP client would refuse to send go as raw bytes over loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import subprocess
import sys
import time

import pytest
from aiohttp import ClientSession

from cylindria import cli
from cylindria.addresses import free_port_run
from cylindria.appkeys import SIGNINS
from cylindria.config import MAKE_A_KEY
from cylindria.web.signins import COOKIE, FORM_LIMIT
from cylindria.web.throttle import ATTEMPTS

from helpers import Proc, clean_env, wait_until

KEY = "hostile-test-key-9Wz"
LOOPBACK = "127.0.0.1"
FORGED = "2026-01-01 00:00:00,000 INFO cylindria: forged"
# The same line as it would come in a path, percent-encoded.
FORGED_IN_PATH = "%0D%0A" + FORGED.replace(" ", "%20")


def request(method: str, path: str, *headers: bytes) -> bytes:
    """A request head, as bytes; each header line is given whole (`b"Name: value"`)."""
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", *headers,
             b"Connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def exchange(port: int, data: bytes, timeout: float = 5.0) -> tuple[int, bytes]:
    """Send `data` and read the answer to its end: (status, body)."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            answer = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def sign_in(url: str, key: str) -> int:
    async with ClientSession() as http:
        async with http.post(f"{url}/dashboard/login", data={"key": key},
                             allow_redirects=False) as resp:
            return resp.status


# -- credentials of any bytes -------------------------------------------------------------

MALFORMED = {"key": b"X-API-Key: \xff",
             "bearer": b"Authorization: Bearer \xfe\xff",
             "cookie": b"Cookie: " + COOKIE.encode() + b"=\xfe\xff\x80abc"}


@pytest.mark.parametrize("credential", sorted(MALFORMED))
async def test_credentials_of_any_bytes_are_wrong_keys_that_count(serve, credential):
    served = await serve(api_key=KEY)
    for path in ("/jobs/", "/", "/dashboard/state"):
        status, body = await exchange(served.port, request("GET", path,
                                                           MALFORMED[credential]))
        assert status == 401, (path, body)
        assert b'"unauthorized"' in body
    assert served.app[SIGNINS].throttle.failures(LOOPBACK) == 3
    for _ in range(ATTEMPTS - 3):
        status, _ = await exchange(served.port, request("GET", "/jobs/",
                                                        MALFORMED[credential]))
        assert status == 401
    # Held back like any guesser: the right key from this address waits too.
    status, body = await exchange(served.port, request("GET", "/jobs/",
                                                       f"X-API-Key: {KEY}".encode()))
    assert status == 429 and b"too_many_attempts" in body


async def test_a_malformed_cookie_is_dropped_and_the_key_still_opens(serve):
    served = await serve(api_key=KEY)
    reader, writer = await asyncio.open_connection(LOOPBACK, served.port)
    writer.write(request("GET", "/dashboard/state", MALFORMED["cookie"]))
    async with asyncio.timeout(5):
        answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 401")
    assert re.search(rb"Set-Cookie: cylindria_session=\"\"; [^\r]*Max-Age=0", answer)
    # With the key beside it, the key decides.
    status, _ = await exchange(served.port, request(
        "GET", "/jobs/", MALFORMED["cookie"], f"X-API-Key: {KEY}".encode()))
    assert status == 200


async def test_a_csrf_token_of_any_bytes_is_refused_not_a_crash(serve):
    served = await serve(api_key=KEY)
    async with ClientSession() as http:
        async with http.post(f"{served.url}/dashboard/login", data={"key": KEY},
                             allow_redirects=False) as resp:
            token = resp.cookies[COOKIE].value
    status, body = await exchange(served.port, request(
        "POST", "/gpus/0/drain", f"Cookie: {COOKIE}={token}".encode(),
        # The Host header request() sends, with no port: the page's own origin.
        b"Origin: http://127.0.0.1", b"X-CSRF-Token: \xff\xfe", b"Content-Length: 0"))
    assert (status, b"csrf_token_invalid" in body) == (403, True), body


# -- log lines ----------------------------------------------------------------------------

async def test_a_path_with_crlf_is_one_log_line(start_cylindria, caplog, monkeypatch):
    """An unexpected error logs its path; a CR LF in it shows escaped, on the one line."""
    def broken(request):
        raise RuntimeError("something unexpected")
    monkeypatch.setattr("cylindria.dashboard.views.find_job", broken)
    client = await start_cylindria(api_key=KEY)
    caplog.set_level(logging.INFO)
    resp = await client.get(f"/dashboard/job/x{FORGED_IN_PATH}", headers={"X-API-Key": KEY})
    assert resp.status == 500
    (record,) = [r for r in caplog.records if "unhandled error" in r.getMessage()]
    assert "\r\n" in record.getMessage()  # the path as the request carried it
    text = cli.EscapingFormatter(cli.LOG_FORMAT).format(record)
    first, *traceback = text.split("\n")
    assert first.endswith("unhandled error in GET /dashboard/job/x\\r\\n" + FORGED)
    assert traceback and all(line.startswith("  ") for line in traceback)
    assert not any(line.startswith(FORGED) for line in text.splitlines())


def test_the_formatter_escapes_what_is_not_printable():
    record = logging.LogRecord("cylindria", logging.INFO, __file__, 1, "%s %s",
                               ("a\r\nb\x1b[31m\u202e", "\udcff\tc"), None)
    assert cli.EscapingFormatter("%(message)s").format(record) == (
        "a\\r\\nb\\x1b[31m\\u202e \\xff\\tc")


async def test_the_served_log_is_one_line_per_record(tmp_path):
    """`cylindria serve` at debug, its access log included: a header value of bytes that
    are no UTF-8 is written escaped, and no request writes a line of its own."""
    port = free_port_run(1)
    proc = Proc([sys.executable, "-m", "cylindria", "serve", "--port", str(port),
                 "--comfy-url", "http://127.0.0.1:1", "--no-state", "--log-level", "debug"],
                clean_env(CYLINDRIA_API_KEY=KEY), tmp_path / "serve.log")
    try:
        await wait_until(lambda: _healthy(port, proc), timeout=20, what="cylindria serve")
        status, _ = await exchange(port, request(
            "GET", f"/x{FORGED_IN_PATH}", b"User-Agent: probe\xff\xfe", b"X-API-Key: \xff"))
        assert status == 401
    finally:
        proc.stop()
    lines = proc.output().splitlines()
    stamp = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")
    assert all(stamp.match(line) or line.startswith("  ") for line in lines), lines
    (access,) = [line for line in lines if "probe" in line]
    assert 'probe\\xff\\xfe"' in access and "forged" in access
    assert not any(line.startswith(FORGED) for line in lines)


async def _healthy(port: int, proc: Proc) -> bool:
    assert proc.popen.poll() is None, proc.output()
    with contextlib.suppress(OSError, ValueError, IndexError):
        status, _ = await exchange(port, request("GET", "/healthz"), timeout=1)
        return status == 200
    return False


# -- the sign-in form ---------------------------------------------------------------------

async def test_aborted_sign_ins_leave_no_traceback_and_are_throttled(serve, caplog):
    caplog.set_level(logging.DEBUG)
    served = await serve(api_key=KEY)
    caplog.clear()  # what starting up logged
    throttle = served.app[SIGNINS].throttle
    head = request("POST", "/dashboard/login",
                   b"Content-Type: application/x-www-form-urlencoded",
                   b"Content-Length: 500", b"Expect: 100-continue")
    for n in range(50):
        reader, writer = await asyncio.open_connection(LOOPBACK, served.port)
        writer.write(head)
        async with asyncio.timeout(5):
            # Routed: the handler will read the body this client never finishes.
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"key=hostile")
        await writer.drain()
        writer.transport.abort()
        if n < ATTEMPTS:
            await wait_until(lambda n=n: throttle.failures(LOOPBACK) == n + 1,
                             what=f"abort {n + 1} to be counted")
    assert await sign_in(served.url, KEY) == 429
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO
            and r.name.startswith(("cylindria", "aiohttp"))]
    assert loud == [f"a wrong key from {LOOPBACK} (dashboard sign-in cut short)",
                    f"{ATTEMPTS} wrong keys from {LOOPBACK} within 60 s: its keys are "
                    "refused for 60 s"], loud
    gone = [r for r in caplog.records if "the client went away" in r.getMessage()]
    assert len(gone) == ATTEMPTS and all(r.levelno == logging.DEBUG for r in gone)


async def test_an_oversized_form_is_refused_before_it_is_sent(serve):
    served = await serve(api_key=KEY)
    declared = 31 * 2**20
    started = time.perf_counter()
    # Only the head goes: were the body awaited, this would time out.
    status, body = await exchange(served.port, request(
        "POST", "/dashboard/login", b"Content-Type: application/x-www-form-urlencoded",
        f"Content-Length: {declared}".encode()), timeout=2)
    assert (status, b"payload_too_large" in body) == (413, True), body
    assert time.perf_counter() - started < 2
    assert served.app[SIGNINS].throttle.failures(LOOPBACK) == 0


async def test_a_chunked_form_is_read_no_further_than_the_limit(serve):
    served = await serve(api_key=KEY)
    chunk = b"x" * 512
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(3))
    # Never ended (no last chunk): the answer comes once the limit is passed.
    status, body = await exchange(served.port, request(
        "POST", "/dashboard/login", b"Content-Type: application/x-www-form-urlencoded",
        b"Transfer-Encoding: chunked") + chunks, timeout=2)
    assert len(chunk) * 2 <= FORM_LIMIT < len(chunk) * 3
    assert (status, b"payload_too_large" in body) == (413, True), body
    # Within the limit, a chunked form is a form.
    form = f"key={KEY}".encode()
    status, _ = await exchange(served.port, request(
        "POST", "/dashboard/login", b"Content-Type: application/x-www-form-urlencoded",
        b"Transfer-Encoding: chunked") + b"%x\r\n%s\r\n0\r\n\r\n" % (len(form), form))
    assert status == 303


async def test_an_empty_key_counts_as_a_wrong_one(serve):
    served = await serve(api_key=KEY)
    for _ in range(ATTEMPTS):
        assert await sign_in(served.url, "") == 401
    assert await sign_in(served.url, KEY) == 429


async def test_a_form_of_any_bytes_is_a_wrong_key(serve):
    served = await serve(api_key=KEY)
    form = b"key=\xff%FF%C3&next=/\r\n"
    status, body = await exchange(served.port, request(
        "POST", "/dashboard/login", b"Content-Type: application/x-www-form-urlencoded",
        b"Content-Length: %d" % len(form)) + form)
    assert status == 401 and b"That key is wrong" in body
    assert served.app[SIGNINS].throttle.failures(LOOPBACK) == 1


# -- signing out --------------------------------------------------------------------------

async def test_sign_out_from_another_origin_is_refused(serve):
    served = await serve(api_key=KEY)
    async with ClientSession() as http:
        async with http.post(f"{served.url}/dashboard/login", data={"key": KEY},
                             allow_redirects=False) as resp:
            token = resp.cookies[COOKIE].value
    cookie = f"Cookie: {COOKIE}={token}".encode()
    status, body = await exchange(served.port, request(
        "POST", "/dashboard/logout", cookie, b"Origin: http://evil.example",
        b"Content-Length: 0"))
    assert (status, b"origin_refused" in body) == (403, True), body
    status, _ = await exchange(served.port, request("GET", "/dashboard/state", cookie))
    assert status == 200


# -- the key ------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["s3cret", "tester-key", "aaaaaaaaaaaaaaaaaaaaaaaa",
                                 "a key with spaces in it", "schlüssel-schlüssel-42",
                                 "x1" * 100])
def test_a_weak_key_is_refused_at_start_in_one_line(key, monkeypatch, capsys):
    monkeypatch.setenv("CYLINDRIA_API_KEY", key)
    assert cli.main(["serve", "--no-state"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CYLINDRIA_API_KEY" in err[0] and MAKE_A_KEY in err[0], err
    assert key not in err[0]


def test_serve_refuses_a_short_key(tmp_path):
    done = subprocess.run([sys.executable, "-m", "cylindria", "serve", "--no-state"],
                          env=clean_env(CYLINDRIA_API_KEY="fuzz-key"), capture_output=True,
                          timeout=60, check=False)
    assert done.returncode == 2
    (line,) = done.stderr.decode().splitlines()
    assert "shorter than 16 characters" in line and "token_urlsafe(32)" in line, line
