"""Where webhooks may go: the address policy, the checks at PUT and at delivery."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket

import pytest
from aiohttp import web
from yarl import URL

from cylindria.addresses import (
    AllowList,
    IPAddress,
    address_kind,
    callback_refusal,
    endpoints,
    free_port_run,
    has_userinfo,
    parse_allow,
    without_userinfo,
)
from cylindria.config import Settings, load_settings
from cylindria.core.registry import Registry
from cylindria.errors import CallbackNotAllowed, ConfigError
from cylindria.upstream.comfy import CallbackClient, open_session, pin
from cylindria.upstream.webhooks import WebhookSender

import workflows
from helpers import FAST, put_job, wait_until, webhook_receiver, webhook_state, with_timing

ip = ipaddress.ip_address
SECRET = "s3cret-pw"
NOTHING = AllowList()


def refusal(address: str, port: int = 443, allow: AllowList = NOTHING,
            forbidden: tuple = (), host: str = "hooks.example.com") -> str | None:
    return callback_refusal(host, ip(address), port, allow, forbidden)


# -- the policy, on address values --------------------------------------------------------

@pytest.mark.parametrize("address", [
    "8.8.8.8", "1.1.1.1", "93.184.215.14", "11.0.0.1", "223.255.255.255",
    # Just outside the private and shared ranges.
    "9.255.255.255", "172.15.255.255", "172.32.0.0", "192.167.255.255", "192.169.0.0",
    "100.63.255.255", "100.128.0.0", "169.253.255.255",
    "2606:4700:4700::1111", "2a00:1450:4001:82a::200e", "2001:4860:4860::8888",
    # IPv4 inside IPv6 is judged as that IPv4 address.
    "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1",
])
def test_public_addresses_may_take_callbacks(address):
    assert address_kind(ip(address)) is None
    assert refusal(address) is None


@pytest.mark.parametrize(("address", "kind"), [
    ("127.0.0.1", "loopback"), ("127.255.255.254", "loopback"), ("::1", "loopback"),
    ("10.0.0.1", "private"), ("10.255.255.255", "private"),
    ("172.16.0.1", "private"), ("172.31.255.255", "private"),
    ("192.168.0.1", "private"), ("192.168.255.255", "private"),
    # Shared address space (carrier-grade NAT) counts as private.
    ("100.64.0.1", "private"), ("100.127.255.255", "private"), ("100.100.100.200", "private"),
    ("169.254.169.254", "link-local"), ("169.254.0.1", "link-local"),
    ("fe80::1", "link-local"), ("fe80::a9fe:a9fe", "link-local"),
    ("fc00::1", "private"), ("fd12:3456:789a::1", "private"),
    ("fec0::1", "private"),  # deprecated site-local
    ("224.0.0.1", "multicast"), ("239.255.255.250", "multicast"), ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"), ("0.1.2.3", "unspecified"), ("::", "unspecified"),
    ("240.0.0.1", "reserved"), ("255.255.255.255", "reserved"), ("192.0.2.1", "reserved"),
    ("198.18.0.1", "reserved"), ("192.0.0.170", "reserved"), ("2001:db8::1", "reserved"),
    ("2001::1", "reserved"), ("100::1", "reserved"), ("::127.0.0.1", "reserved"),
    ("5f00::1", "reserved"), ("4000::1", "reserved"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:169.254.169.254", "link-local"),
    ("::ffff:10.0.0.1", "private"), ("::ffff:0.0.0.0", "unspecified"),
    ("64:ff9b::7f00:1", "loopback"), ("64:ff9b::a9fe:a9fe", "link-local"),
    ("64:ff9b:1::1", "private"),
    ("2002:7f00:1::1", "loopback"), ("2002:a00:1::1", "private"),
])
def test_inner_addresses_are_refused(address, kind):
    assert address_kind(ip(address)) == f"a{'n' if kind[0] in 'aeiou' else ''} {kind} address"
    reason = refusal(address)
    assert reason is not None and kind in reason and "CYLINDRIA_CALLBACK_ALLOW" in reason


def test_a_refusal_reads_as_a_sentence_about_the_url():
    assert refusal("127.0.0.1", 8188) == (
        "points at a loopback address (127.0.0.1); callbacks may only go to public "
        "addresses, or to hosts the operator lists in CYLINDRIA_CALLBACK_ALLOW.")


def test_an_ipv6_scope_does_not_hide_a_link_local_address():
    assert "link-local" in refusal("fe80::1%eth0")


def test_a_gpus_comfyui_is_refused_even_with_loopback_allowed():
    loopback = parse_allow(["127.0.0.0/8", "::1"])
    gpu = endpoints(ip("127.0.0.1"), 8188, "GPU 0's ComfyUI")
    for address in ("127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1", "0.0.0.0", "::"):
        reason = refusal(address, 8188, loopback, gpu, host="127.0.0.1")
        assert reason is not None and "GPU 0's ComfyUI" in reason, address
    assert refusal("127.0.0.1", 8188, loopback, gpu) == (
        "points at GPU 0's ComfyUI (127.0.0.1:8188); callbacks never go to this service's "
        "ComfyUIs or to Cylindria itself.")
    assert refusal("127.0.0.1", 8189, loopback, gpu) is None
    assert refusal("::1", 8189, loopback, gpu) is None


def test_a_comfyui_elsewhere_is_refused_by_address_and_port():
    inner = parse_allow(["10.0.0.0/8", "comfy.lan"])
    gpu = endpoints(ip("10.1.2.3"), 8188, "GPU 1's ComfyUI")
    assert "GPU 1's ComfyUI" in refusal("10.1.2.3", 8188, inner, gpu)
    assert "GPU 1's ComfyUI" in refusal("10.1.2.3", 8188, inner, gpu, host="comfy.lan")
    assert "GPU 1's ComfyUI" in refusal("::ffff:10.1.2.3", 8188, inner, gpu)
    assert refusal("10.1.2.3", 9000, inner, gpu) is None
    assert refusal("10.1.2.4", 8188, inner, gpu) is None


def test_cylindria_on_every_address_closes_its_port_everywhere():
    own = endpoints(ip("0.0.0.0"), 8000, "Cylindria itself")
    assert "Cylindria itself" in refusal("8.8.8.8", 8000, forbidden=own)
    assert "Cylindria itself" in refusal("2606:4700:4700::1111", 8000, forbidden=own)
    assert "Cylindria itself" in refusal("127.0.0.1", 8000, parse_allow(["127.0.0.1"]), own)
    assert refusal("8.8.8.8", 443, forbidden=own) is None
    assert endpoints(ip("8.8.4.4"), 8000, "x")[0].network == ipaddress.ip_network("8.8.4.4/32")


def test_allow_list_hosts_match_exactly_without_regard_to_case():
    allow = parse_allow(["Hooks.Internal.Example.", " "])
    assert allow.hosts == frozenset({"hooks.internal.example"})
    for host in ("hooks.internal.example", "HOOKS.internal.EXAMPLE", "hooks.internal.example."):
        assert refusal("10.0.0.5", allow=allow, host=host) is None
        assert refusal("127.0.0.1", allow=allow, host=host) is None
    for host in ("a.hooks.internal.example", "hooks.internal.example.evil", "internal.example"):
        assert refusal("10.0.0.5", allow=allow, host=host) is not None


def test_allow_list_networks_match_the_resolved_address():
    allow = parse_allow(["10.0.0.0/8", "192.168.1.5", "fd00::/8", "::1", "172.16.9.9/12"])
    for address in ("10.0.0.1", "10.255.0.1", "192.168.1.5", "fd00::7", "::1",
                    "::ffff:10.1.1.1", "172.20.0.1"):
        assert refusal(address, allow=allow, host="anything.example") is None, address
    for address in ("192.168.1.6", "127.0.0.1", "fe80::1", "169.254.169.254", "fc00::1"):
        assert refusal(address, allow=allow, host="anything.example") is not None, address
    # Host bits are forgiven: 172.16.9.9/12 means 172.16.0.0/12.
    assert ipaddress.ip_network("172.16.0.0/12") in allow.networks


@pytest.mark.parametrize("entry", ["*.example.com", "http://hooks.example.com", "10.0.0.0/33",
                                   "hooks example", "-bad.example", "a..b", "bücher.de",
                                   "x" * 64 + ".example"])
def test_allow_list_refuses_what_is_neither_network_nor_host(entry):
    with pytest.raises(ValueError):
        parse_allow(["10.0.0.0/8", entry])
    with pytest.raises(ConfigError) as caught:
        Settings(callback_allow=("10.0.0.0/8", entry))
    message = str(caught.value)
    assert "CYLINDRIA_CALLBACK_ALLOW" in message and "\n" not in message


def test_allow_list_comes_from_the_environment():
    assert Settings().callback_allow == ()
    env = {"CYLINDRIA_CALLBACK_ALLOW": " hooks.example.com, 10.0.0.0/8,,::1 "}
    settings = load_settings({}, env)
    assert settings.callback_allow == ("hooks.example.com", "10.0.0.0/8", "::1")
    with pytest.raises(ConfigError, match="CYLINDRIA_CALLBACK_ALLOW"):
        load_settings({}, {"CYLINDRIA_CALLBACK_ALLOW": "10.0.0.0/8,no way"})


def test_userinfo_is_found_and_never_shown():
    for url in ("http://user:pw@hooks.example.com/x", "http://user@hooks.example.com/x",
                "http://@hooks.example.com/x", "http://a@b@hooks.example.com/x"):
        assert has_userinfo(url)
        assert without_userinfo(url) == "http://hooks.example.com/x"
    assert not has_userinfo("http://hooks.example.com/a@b?c=d@e")
    assert without_userinfo("http://hooks.example.com/a@b") == "http://hooks.example.com/a@b"
    assert without_userinfo("http://u:pw@[::1") == "(not a URL)"


# -- the request goes to the address that was checked ------------------------------------

def test_a_pinned_request_keeps_the_name_for_host_and_tls():
    pinned = pin(URL("https://Hooks.Example.com:8443/a/b?c=d"), ip("93.184.215.14"))
    assert str(pinned.url) == "https://93.184.215.14:8443/a/b?c=d"
    assert pinned.host_header == "hooks.example.com:8443"
    assert pinned.server_hostname == "hooks.example.com"


def test_a_pinned_request_over_http_needs_no_tls_name():
    pinned = pin(URL("http://hooks.example.com/a"), ip("2606:4700::6810:84e5"))
    assert str(pinned.url) == "http://[2606:4700::6810:84e5]/a"
    assert pinned.host_header == "hooks.example.com"
    assert pinned.server_hostname is None


def test_a_url_with_an_address_is_pinned_to_itself():
    pinned = pin(URL("https://[::1]:9443/a"), ip("::1"))
    assert str(pinned.url) == "https://[::1]:9443/a"
    assert pinned.host_header == "[::1]:9443" and pinned.server_hostname is None


class FakeResolver:
    """Answers each look-up with the next list given, so no real name is ever resolved."""

    def __init__(self, *answers: list[str] | Exception) -> None:
        self.answers = list(answers)
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> list[IPAddress]:
        self.asked.append(host)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return [ip(a) for a in answer]


async def host_receiver(aiohttp_server) -> tuple[int, list[dict[str, str]]]:
    """A loopback receiver that keeps each request's headers; its port."""
    seen: list[dict[str, str]] = []

    async def hook(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    server = await aiohttp_server(app)
    return server.port, seen


async def test_a_callback_connects_to_the_checked_address_not_the_name(aiohttp_server):
    port, seen = await host_receiver(aiohttp_server)
    # The name resolves nowhere for real: only the address it was checked as can be used.
    resolver = FakeResolver(["127.0.0.1"])
    async with open_session(1, FAST) as session:
        client = CallbackClient(session, parse_allow(["127.0.0.1"]), (), 1.0, resolver)
        status = await client.post(f"http://hooks.invalid:{port}/hook", b"{}", {}, 2.0)
    assert status == 204 and resolver.asked == ["hooks.invalid"]
    assert seen[0]["Host"] == f"hooks.invalid:{port}"


async def test_a_name_that_changes_to_a_closed_address_is_refused_at_delivery(aiohttp_server):
    url, calls = await webhook_receiver(aiohttp_server, fail_first=0)
    port = URL(url).port
    # Checked at PUT time as 127.0.0.2 (allowed); by delivery it says 127.0.0.1 (not).
    resolver = FakeResolver(["127.0.0.2"], ["127.0.0.1"])
    async with open_session(1, FAST) as session:
        client = CallbackClient(session, parse_allow(["127.0.0.2"]), (), 1.0, resolver)
        await client.check(f"http://rebind.invalid:{port}/hook")
        with pytest.raises(CallbackNotAllowed, match="loopback address"):
            await client.post(f"http://rebind.invalid:{port}/hook", b"{}", {}, 2.0)
    assert calls == []


async def test_every_address_of_a_host_is_checked(aiohttp_server):
    url, calls = await webhook_receiver(aiohttp_server, fail_first=0)
    port = URL(url).port
    resolver = FakeResolver(["127.0.0.2", "127.0.0.1"])
    async with open_session(1, FAST) as session:
        client = CallbackClient(session, parse_allow(["127.0.0.2"]), (), 1.0, resolver)
        with pytest.raises(CallbackNotAllowed, match=r"loopback address \(127\.0\.0\.1\)"):
            await client.check(f"http://two.invalid:{port}/hook")
        with pytest.raises(CallbackNotAllowed):
            await client.post(f"http://two.invalid:{port}/hook", b"{}", {}, 2.0)
    assert calls == []


async def test_the_next_checked_address_is_tried_when_one_does_not_connect(aiohttp_server):
    url, calls = await webhook_receiver(aiohttp_server, fail_first=0)
    port = URL(url).port
    # Nothing listens on 127.0.0.2 at the receiver's port.
    resolver = FakeResolver(["127.0.0.2", "127.0.0.1"])
    async with open_session(1, FAST) as session:
        client = CallbackClient(session, parse_allow(["127.0.0.0/8"]), (), 1.0, resolver)
        assert await client.post(f"http://two.invalid:{port}/hook", b"{}", {}, 2.0) == 204
    assert len(calls) == 1


async def slow(host: str, port: int) -> list[IPAddress]:
    await asyncio.sleep(30)
    return []


@pytest.mark.parametrize("resolver", [FakeResolver(socket.gaierror(socket.EAI_NONAME, "nope")),
                                      FakeResolver([]), slow])
async def test_a_host_that_does_not_resolve_is_refused(resolver):
    async with open_session(1, FAST) as session:
        client = CallbackClient(session, parse_allow(["127.0.0.0/8"]), (), 0.1, resolver)
        with pytest.raises(CallbackNotAllowed, match="does not resolve") as caught:
            await client.check("http://nowhere.invalid/hook")
    assert caught.value.status == 422 and caught.value.code == "callback_not_allowed"


async def test_an_old_url_with_credentials_is_neither_called_nor_shown(aiohttp_server, caplog):
    """A state file written before credentials were refused may still hold one."""
    caplog.set_level(logging.DEBUG)
    url, calls = await webhook_receiver(aiohttp_server, fail_first=0)
    port = URL(url).port
    registry = Registry()
    async with open_session(1, FAST) as session:
        client = CallbackClient(session, parse_allow(["127.0.0.0/8"]), (), 1.0)
        sender = WebhookSender(registry, client, None, FAST, lambda job: b"{}")
        registry.subscribe(sender.on_change)
        job = registry.begin("old", 0, "p-old", "f", ["1"],
                             callback_url=f"http://user:{SECRET}@127.0.0.1:{port}/hook")
        registry.confirm(job)
        registry.on_start("p-old")
        registry.on_success("p-old")
        await wait_until(lambda: job.webhook["state"] == "failed", what="the refusal")
        await sender.close()
    assert job.webhook["url"] == f"http://127.0.0.1:{port}/hook"
    assert "user name or password" in job.webhook["last_error"]
    assert calls == []
    assert not [r for r in caplog.records if SECRET in r.getMessage()]


# -- through the API, with loopback receivers only -----------------------------------------

async def refused(client, job_id: str, url: str) -> str:
    status, body = await put_job(client, job_id, workflows.quick(),
                                 headers={"X-Callback-Url": url})
    assert status == 422, body
    assert body["error"]["code"] == "callback_not_allowed" and not body["accepted"]
    assert (await client.get(f"/jobstatus/{job_id}/")).status == 404
    return body["error"]["message"]


async def test_loopback_callbacks_are_refused_unless_allowed(start_cylindria, start_sims,
                                                             aiohttp_server):
    cluster = await start_sims(1)
    url, calls = await webhook_receiver(aiohttp_server, fail_first=0)
    client = await start_cylindria(cluster, callback_allow=())
    message = await refused(client, "hook", url)
    assert message == (f"X-Callback-Url {url} points at a loopback address (127.0.0.1); "
                       "callbacks may only go to public addresses, or to hosts the "
                       "operator lists in CYLINDRIA_CALLBACK_ALLOW.")
    assert "loopback" in await refused(client, "v6", f"http://[::1]:{URL(url).port}/hook")
    assert "GPU 0's ComfyUI" in await refused(client, "sim", f"{cluster.base_url}/interrupt")
    assert "unspecified" in await refused(client, "any", f"http://0.0.0.0:{URL(url).port}/h")
    assert calls == [] and cluster.count(0, "POST", "/interrupt") == 0


async def test_an_allowed_loopback_callback_is_delivered(start_cylindria, start_sims,
                                                         aiohttp_server):
    cluster = await start_sims(1)
    url, calls = await webhook_receiver(aiohttp_server, fail_first=0)
    client = await start_cylindria(cluster, callback_allow=("127.0.0.1/32",))
    status, _ = await put_job(client, "hook", workflows.quick(), headers={"X-Callback-Url": url})
    assert status == 202
    body = await wait_until(lambda: webhook_state(client, "hook", "delivered"), what="delivery")
    assert body["webhook"]["url"] == url and len(calls) == 1


async def test_callbacks_to_the_service_itself_are_refused_with_loopback_allowed(
        start_cylindria, start_sims, aiohttp_server):
    cluster = await start_sims(2)
    own_port = free_port_run(1)  # nothing need listen there: it is refused at PUT
    client = await start_cylindria(cluster, port=own_port)
    for gpu in (0, 1):
        port = cluster.base_port + gpu
        for host in ("127.0.0.1", "[::1]", "127.0.0.9"):
            message = await refused(client, f"g{gpu}", f"http://{host}:{port}/interrupt")
            assert f"points at GPU {gpu}'s ComfyUI" in message
    assert "Cylindria itself" in await refused(client, "me", f"http://127.0.0.1:{own_port}/x")
    assert cluster.count(0, "POST", "/interrupt") == cluster.count(1, "POST", "/interrupt") == 0


async def test_credentials_in_a_callback_are_refused_and_never_repeated(
        start_cylindria, start_sims, aiohttp_server, caplog):
    caplog.set_level(logging.DEBUG)
    cluster = await start_sims(1)
    url, calls = await webhook_receiver(aiohttp_server, fail_first=0)
    client = await start_cylindria(cluster)  # loopback allowed: credentials still are not
    with_secret = url.replace("http://", f"http://user:{SECRET}@")
    for n, bad in enumerate((with_secret, with_secret.replace("user:", ""),
                             url.replace("http://", "http://@"))):
        resp = await client.put(f"/startjob/c{n}/", data=b"{}",
                                headers={"X-Callback-Url": bad})
        text = await resp.text()
        assert resp.status == 422 and "callback_not_allowed" in text and SECRET not in text
        assert "user name or password" in text
    for n, bad in enumerate((f"ftp://user:{SECRET}@127.0.0.1/x",
                             f"http://user:{SECRET}@[::1")):
        resp = await client.put(f"/startjob/b{n}/", data=b"{}",
                                headers={"X-Callback-Url": bad})
        text = await resp.text()
        assert resp.status == 400 and SECRET not in text
    jobs = await client.get("/jobs/")
    assert SECRET not in await jobs.text()
    assert calls == []
    assert not [r for r in caplog.records if SECRET in r.getMessage()]


async def test_a_redirect_from_a_callback_is_not_followed(start_cylindria, start_sims,
                                                          aiohttp_server):
    cluster = await start_sims(1)
    target, target_calls = await webhook_receiver(aiohttp_server, fail_first=0)
    redirects: list[str] = []

    async def bounce(request: web.Request) -> web.Response:
        redirects.append(request.path)
        raise web.HTTPFound(target)

    app = web.Application()
    app.router.add_post("/hook", bounce)
    server = await aiohttp_server(app)
    client = await start_cylindria(cluster, timing=with_timing(webhook_backoff=0.01))
    status, _ = await put_job(client, "bounced", workflows.quick(),
                              headers={"X-Callback-Url": f"http://127.0.0.1:{server.port}/hook"})
    assert status == 202
    body = await wait_until(lambda: webhook_state(client, "bounced", "failed"), what="give up")
    assert body["webhook"]["last_error"] == "HTTP 302" and len(redirects) == 4
    assert target_calls == []
