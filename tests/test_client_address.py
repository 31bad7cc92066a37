"""The client address behind a trusted proxy: X-Forwarded-For and Forwarded from the
proxies the operator lists, and never from anyone else.

The documentation addresses (198.51.100.x, 2001:db8::x) are only header text here:
every connection is on loopback.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

import pytest
from aiohttp import ClientSession, TCPConnector
from hypothesis import given, settings
from hypothesis import strategies as st

from cylindria import cli
from cylindria.appkeys import SIGNINS
from cylindria.config import ConfigError, Settings, load_settings, trusted_networks
from cylindria.web.clients import TrustedProxies, node_address, x_forwarded_for
from cylindria.web.signins import COOKIE
from cylindria.web.throttle import ATTEMPTS

KEY = "s3cret"
WRONG = "not-the-key"
GUESSER = "198.51.100.7"
OTHER = "198.51.100.8"


def xff(address: str, key: str = WRONG) -> dict[str, str]:
    return {"X-Forwarded-For": address, "X-API-Key": key}


async def keyed(start_cylindria, trusted: tuple[str, ...]):
    """Cylindria with an API key behind the given proxies, its throttle's clock held
    still so that no wrong key ages out during the test."""
    client = await start_cylindria(api_key=KEY, trusted_proxies=trusted)
    client.app[SIGNINS].throttle.clock = lambda: 1000.0
    return client


async def status(client, headers: dict[str, str], path: str = "/jobs/") -> int:
    resp = await client.get(path, headers=headers)
    await resp.read()
    return resp.status


async def sign_in(client, key: str, forwarded_for: str):
    resp = await client.post("/dashboard/login", data={"key": key, "next": "/"},
                             headers={"X-Forwarded-For": forwarded_for},
                             allow_redirects=False)
    await resp.read()
    client.session.cookie_jar.clear()
    return resp


# -- reading the hops -----------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("198.51.100.7", "198.51.100.7"),
    (" 198.51.100.7 ", "198.51.100.7"),
    ("198.51.100.7:4711", "198.51.100.7"),
    ("2001:db8::7", "2001:db8::7"),
    ("2001:DB8:0:0::7", "2001:db8::7"),
    ("[2001:db8::7]", "2001:db8::7"),
    ("[2001:db8::7]:4711", "2001:db8::7"),
    ("::ffff:198.51.100.7", "198.51.100.7"),
    ("unknown", None), ("_hidden", None), ("", None), (None, None),
    ("198.51.100.7:", None), ("198.51.100.7:http", None), ("198.51.100.7:123456", None),
    ("[2001:db8::7", None), ("[2001:db8::7]x", None), ("[2001:db8::7]:", None),
    ("198.51.100", None), ("198.51.100.007", None), ("example.com", None),
    ("198.51.100.7 198.51.100.8", None),
])
def test_a_hop_is_an_address_with_or_without_a_port(text, expected):
    found = node_address(text)
    assert (str(found) if found else None) == expected


PROXIES = TrustedProxies(trusted_networks(["127.0.0.1", "10.0.0.0/8", "2001:db8:f::/48"]))


@pytest.mark.parametrize("header, expected", [
    # nginx appended the address it saw; the client wrote everything left of it.
    ("198.51.100.7", GUESSER),
    ("198.51.100.8, 198.51.100.7", GUESSER),
    ("garbage, 198.51.100.7", GUESSER),
    # Proxies in a row: each trusted hop is passed over.
    ("198.51.100.7, 10.1.2.3", GUESSER),
    ("198.51.100.8, 198.51.100.7, 10.1.2.3, 2001:db8:f::1", GUESSER),
    # Only trusted hops: the request began at a proxy's host.
    ("10.1.2.3, 127.0.0.1", "10.1.2.3"),
    # Nothing usable before the client is found: nobody is named.
    ("198.51.100.7, garbage", None), ("198.51.100.7, ", None), ("", None),
    ("198.51.100.7, unknown, 10.1.2.3", None),
])
def test_the_client_is_the_right_most_hop_no_proxy_claims(header, expected):
    found = PROXIES.client(x_forwarded_for([header]))
    assert (str(found) if found else None) == expected


def test_several_header_lines_are_one_list_in_order():
    assert x_forwarded_for(["198.51.100.8, 198.51.100.7", "10.1.2.3"]) == [
        "198.51.100.8", "198.51.100.7", "10.1.2.3"]
    assert str(PROXIES.client(x_forwarded_for(["198.51.100.8", "198.51.100.7"]))) == GUESSER


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.one_of(st.text(), st.ip_addresses().map(str)), max_size=6))
def test_no_header_text_fails_the_walk(lines):
    hops = x_forwarded_for(lines)
    found = PROXIES.client(hops)
    # Whatever comes out is an address one of the hops wrote, and no proxy's unless
    # every hop is one.
    assert found is None or found in {node_address(hop) for hop in hops}
    assert found is None or not PROXIES.trusts(found) or all(
        PROXIES.trusts(node_address(hop)) for hop in hops)


# -- the setting -----------------------------------------------------------------------

def test_the_proxies_come_from_the_environment():
    assert Settings().trusted_proxies == ()
    settings_ = load_settings({}, {"CYLINDRIA_TRUSTED_PROXIES": " 127.0.0.1, ::1,,10.0.0.0/24 "})
    assert settings_.trusted_proxies == ("127.0.0.1", "::1", "10.0.0.0/24")
    assert trusted_networks(settings_.trusted_proxies) == (
        ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("10.0.0.0/24"))


@pytest.mark.parametrize("entry", ["nginx.internal", "10.0.0.1/8", "10.0.0.0/33",
                                   "300.1.2.3", "127.0.0.1:80", "::1/129", "*"])
def test_a_bad_proxy_entry_stops_start_up_naming_the_variable(entry, capsys, monkeypatch):
    with pytest.raises(ConfigError) as caught:
        Settings(trusted_proxies=("127.0.0.1", entry))
    message = str(caught.value)
    assert message.startswith("CYLINDRIA_TRUSTED_PROXIES entry ") and repr(entry) in message
    assert "\n" not in message
    with pytest.raises(ConfigError, match=r"^CYLINDRIA_TRUSTED_PROXIES"):
        load_settings({}, {"CYLINDRIA_TRUSTED_PROXIES": f"127.0.0.1,{entry}"})
    monkeypatch.setenv("CYLINDRIA_TRUSTED_PROXIES", f"::1,{entry}")
    assert cli.main(["serve", "--no-state"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CYLINDRIA_TRUSTED_PROXIES" in err[0], err


# -- over loopback: the wrong-key throttle -----------------------------------------------

async def test_behind_a_trusted_proxy_one_client_guessing_never_blocks_another(
        start_cylindria, caplog):
    caplog.set_level(logging.INFO, logger="cylindria.web.throttle")
    client = await keyed(start_cylindria, ("127.0.0.1",))
    for _ in range(ATTEMPTS):
        assert await status(client, xff(GUESSER)) == 401
    assert await status(client, xff(GUESSER)) == 429
    assert await status(client, xff(GUESSER, KEY)) == 429
    # Another client behind the same proxy: its key still works, its wrong keys are its own.
    assert await status(client, xff(OTHER, KEY)) == 200
    assert await status(client, xff(OTHER)) == 401
    # So does the proxy's own host, and a client that reached the proxy over IPv6.
    assert await status(client, {"X-API-Key": KEY}) == 200
    assert await status(client, xff("2001:db8::7", KEY)) == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "cylindria.web.throttle"]
    assert lines[0] == f"a wrong key from {GUESSER} (X-API-Key header)"
    assert lines[1].startswith(f"{ATTEMPTS} wrong keys from {GUESSER} within")
    assert "127.0.0.1" not in " ".join(lines)


async def test_a_client_cannot_escape_by_writing_hops_of_its_own(start_cylindria):
    client = await keyed(start_cylindria, ("127.0.0.1",))
    # The proxy appends the address it saw (GUESSER); what the client put before it
    # changes with every guess, and counts for nothing.
    for n in range(ATTEMPTS):
        assert await status(client, xff(f"198.51.100.{100 + n}, {GUESSER}")) == 401
    assert await status(client, xff(f"{OTHER}, {GUESSER}", KEY)) == 429
    assert await status(client, xff(OTHER, KEY)) == 200


async def test_the_forwarded_header_names_the_client_without_x_forwarded_for(
        start_cylindria):
    client = await keyed(start_cylindria, ("127.0.0.1",))
    for _ in range(ATTEMPTS):
        assert await status(client, {"Forwarded": f"for={GUESSER};proto=https",
                                     "X-API-Key": WRONG}) == 401
    assert await status(client, {"Forwarded": f'for="{GUESSER}:4711"',
                                 "X-API-Key": KEY}) == 429
    # The same client by X-Forwarded-For; X-Forwarded-For wins when both are sent.
    assert await status(client, xff(GUESSER, KEY)) == 429
    assert await status(client, {"Forwarded": f"for={GUESSER}", "X-Forwarded-For": OTHER,
                                 "X-API-Key": KEY}) == 200
    assert await status(client, {"Forwarded": 'for="[2001:db8::8]:4711", for=127.0.0.1',
                                 "X-API-Key": KEY}) == 200


@pytest.mark.parametrize("trusted", [(), ("192.0.2.0/24", "::1")])
async def test_from_a_peer_not_trusted_the_headers_change_nothing(start_cylindria, trusted):
    client = await keyed(start_cylindria, trusted)
    for n in range(ATTEMPTS // 2):
        assert await status(client, xff(f"198.51.100.{n}")) == 401
        assert await status(client, {"Forwarded": f"for=198.51.100.{50 + n}",
                                     "X-API-Key": WRONG}) == 401
    # Every guess counted against the peer, whatever address it claimed.
    assert await status(client, xff(OTHER, KEY)) == 429
    assert await status(client, {"X-API-Key": KEY}) == 429


async def test_a_peer_beside_the_trusted_one_is_not_trusted(start_cylindria):
    client = await keyed(start_cylindria, ("127.0.0.1",))
    url = client.make_url("/jobs/")
    async with ClientSession(connector=TCPConnector(local_addr=("127.0.0.2", 0))) as other:
        for n in range(ATTEMPTS):
            async with other.get(url, headers=xff(f"198.51.100.{n}")) as resp:
                assert resp.status == 401
        async with other.get(url, headers=xff(OTHER, KEY)) as resp:
            assert resp.status == 429
    # The trusted proxy's clients, OTHER among them, never see 127.0.0.2's guesses.
    assert await status(client, xff(OTHER, KEY)) == 200
    assert await status(client, xff("127.0.0.2", KEY)) == 429


@pytest.mark.parametrize("headers", [
    {"X-Forwarded-For": "not-an-address"},
    {"X-Forwarded-For": ""},
    {"X-Forwarded-For": f"{GUESSER}, "},
    {"X-Forwarded-For": f"{GUESSER},,[2001:db8::1"},
    {"X-Forwarded-For": f"{GUESSER}:99999"},
    {"X-Forwarded-For": "unknown"},
    {"Forwarded": "for="},
    {"Forwarded": 'for="198.51.100.7'},
    {"Forwarded": ";;,,==;"},
    {"Forwarded": "for=unknown"},
    {"Forwarded": "for=_hidden;proto=https"},
    {"Forwarded": "proto=https"},
])
async def test_a_malformed_header_from_the_proxy_counts_against_the_proxy(
        start_cylindria, headers: dict[str, Any]):
    client = await keyed(start_cylindria, ("127.0.0.1",))
    assert await status(client, {**headers, "X-API-Key": KEY}) == 200
    for _ in range(ATTEMPTS):
        assert await status(client, {**headers, "X-API-Key": WRONG}) == 401
    assert await status(client, {**headers, "X-API-Key": KEY}) == 429
    assert await status(client, {"X-API-Key": KEY}) == 429
    # A well-formed header still names its own client.
    assert await status(client, xff(OTHER, KEY)) == 200


# -- over loopback: the dashboard's sign-in -----------------------------------------------

async def test_the_sign_in_throttle_follows_the_forwarded_client(start_cylindria, caplog):
    caplog.set_level(logging.INFO, logger="cylindria.dashboard.views")
    client = await keyed(start_cylindria, ("127.0.0.1",))
    # Both ways of giving a key count together, for the client the proxy names.
    for _ in range(ATTEMPTS // 2):
        assert await status(client, xff(GUESSER)) == 401
    for _ in range(ATTEMPTS - ATTEMPTS // 2):
        assert (await sign_in(client, WRONG, GUESSER)).status == 401
    resp = await sign_in(client, KEY, GUESSER)
    assert resp.status == 429 and COOKIE not in resp.cookies
    resp = await sign_in(client, KEY, OTHER)
    assert resp.status == 303 and COOKIE in resp.cookies
    assert f"dashboard sign-in from {OTHER}" in [r.getMessage() for r in caplog.records]


async def test_the_sign_in_form_ignores_the_header_from_an_untrusted_peer(start_cylindria):
    client = await keyed(start_cylindria, ())
    for n in range(ATTEMPTS):
        assert (await sign_in(client, WRONG, f"198.51.100.{n}")).status == 401
    assert (await sign_in(client, KEY, OTHER)).status == 429


# -- served as `cylindria serve` serves it -----------------------------------------------

async def test_the_served_app_counts_each_forwarded_client_alone(serve):
    served = await serve(api_key=KEY, trusted_proxies=("127.0.0.0/8", "::1"))
    served.app[SIGNINS].throttle.clock = lambda: 1000.0
    async with ClientSession() as session:
        for _ in range(ATTEMPTS):
            async with session.get(f"{served.url}/jobs/", headers=xff(GUESSER)) as resp:
                assert resp.status == 401
        async with session.get(f"{served.url}/jobs/", headers=xff(GUESSER, KEY)) as resp:
            assert resp.status == 429
        async with session.get(f"{served.url}/jobs/", headers=xff(OTHER, KEY)) as resp:
            assert resp.status == 200
