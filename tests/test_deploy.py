"""Deploying: two Cylindria hosts behind a real nginx with the shipped configuration,
the systemd units checked by systemd-analyze, and the container recipe's promises."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cylindria.addresses import free_port_run
from cylindria.cli import build_parser
from cylindria.config import check_api_key, load_settings
from cylindria.errors import ConfigError
from cylindria.web.throttle import ATTEMPTS

import workflows

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
NGINX = Path("/usr/sbin/nginx")
KEY = "deploy-test-key-4Hc"
JOBS = 200

pytestmark = pytest.mark.slow


def nginx_config(tmp: Path, front: int, ports: dict[str, int], hosts: list[int],
                 shipped: str = "cylindria.conf") -> Path:
    """The shipped configuration `shipped`, pointed at this test's two hosts and ports,
    inside a main configuration that keeps everything in `tmp`."""
    conf = (DEPLOY / "nginx" / shipped).read_text()
    conf = conf.replace("10.0.0.11:8000", f"127.0.0.1:{hosts[0]}")
    conf = conf.replace("10.0.0.12:8000", f"127.0.0.1:{hosts[1]}")
    conf = conf.replace("listen 8000;", f"listen 127.0.0.1:{front};")
    for name, port in ports.items():
        conf = conf.replace(f"listen {name};", f"listen 127.0.0.1:{port};")
    assert "10.0.0.1" not in re.sub(r"#.*", "", conf)
    (tmp / "cylindria.conf").write_text(conf)
    temp = {kind: tmp / kind for kind in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    main = [
        # A master started as root hands work to `nobody` unless told otherwise.
        "user root;" if os.geteuid() == 0 else "",
        "worker_processes 1;", f"pid {tmp / 'nginx.pid'};", "error_log stderr warn;",
        "events { worker_connections 256; }",
        "http {", "  access_log off;",
        *(f"  {kind}_temp_path {path};" for kind, path in
          [("client_body", temp["body"]), ("proxy", temp["proxy"]),
           ("fastcgi", temp["fastcgi"]), ("uwsgi", temp["uwsgi"]), ("scgi", temp["scgi"])]),
        f"  include {tmp / 'cylindria.conf'};", "}",
    ]
    path = tmp / "nginx.conf"
    path.write_text("\n".join(main) + "\n")
    return path


@pytest.fixture
def nginx() -> Path:
    # CI installs it; a missing nginx must fail the run, never skip the test.
    if not NGINX.exists():
        pytest.fail(f"{NGINX} is missing: install Debian's nginx package "
                    "(apt-get install nginx) to run the load-balancer test.")
    return NGINX


def start_nginx(binary: Path, tmp: Path, conf: Path) -> tuple[subprocess.Popen, Any]:
    log = (tmp / "nginx.log").open("wb")
    proc = subprocess.Popen([str(binary), "-p", str(tmp), "-c", str(conf), "-g",
                             "daemon off;"], stdout=log, stderr=subprocess.STDOUT)
    return proc, log


def nginx_log(tmp: Path) -> str:
    return (tmp / "nginx.log").read_text()


@pytest.fixture
async def balancer(nginx, start_cylindria, start_sims, tmp_path):
    """Two hosts, each Cylindria with two simulated GPUs of its own, and nginx."""
    hosts = []
    for _ in range(2):
        cluster = await start_sims(2)
        # nginx connects from loopback, as it would from the balancer's address.
        hosts.append(await start_cylindria(cluster, api_key=KEY,
                                           trusted_proxies=("127.0.0.1",)))
    front = free_port_run(1)
    ports = {"8001": free_port_run(1), "8002": free_port_run(1)}
    conf = nginx_config(tmp_path, front, ports, [h.server.port for h in hosts])
    proc, log = start_nginx(nginx, tmp_path, conf)
    base = f"http://127.0.0.1:{front}"
    try:
        async with aiohttp.ClientSession(headers={"X-API-Key": KEY}) as session:
            await until_nginx_answers(proc, tmp_path, session, base)
            yield base, hosts, session, {n: f"http://127.0.0.1:{p}" for n, p in
                                         zip((0, 1), ports.values(), strict=True)}
    finally:
        stop_nginx(proc, log)


async def until_nginx_answers(proc: subprocess.Popen, tmp: Path,
                              session: aiohttp.ClientSession, base: str) -> None:
    """Wait until nginx passes a request on to a host (a job no host knows: 404)."""
    deadline = time.monotonic() + 10
    while True:
        assert proc.poll() is None, nginx_log(tmp)
        try:
            async with session.get(f"{base}/jobstatus/none/") as resp:
                if resp.status == 404:
                    return
        except aiohttp.ClientError:
            pass
        assert time.monotonic() < deadline, "nginx did not start"
        await asyncio.sleep(0.05)


def stop_nginx(proc: subprocess.Popen, log: Any) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


async def where(hosts, job_id: str) -> list[int]:
    """The hosts that know this job, asked directly."""
    found = []
    for n, host in enumerate(hosts):
        resp = await host.get(f"/jobstatus/{job_id}/", headers={"X-API-Key": KEY})
        if resp.status == 200:
            found.append(n)
    return found


async def test_two_hosts_behind_nginx_each_job_on_its_host(balancer):
    base, hosts, session, per_host = balancer
    job_ids = [f"lb-{n}" for n in range(JOBS)]
    pending = list(job_ids)

    async def submit() -> None:
        while pending:
            job_id = pending.pop()
            async with session.put(f"{base}/startjob/{job_id}/", params={"GpuId": "auto"},
                                   json=workflows.quick()) as resp:
                assert resp.status == 202, await resp.text()

    await asyncio.gather(*(submit() for _ in range(16)))

    async def finished() -> dict[str, dict]:
        states = {}
        for job_id in job_ids:
            async with session.get(f"{base}/jobstatus/{job_id}/") as resp:
                assert resp.status == 200
                states[job_id] = await resp.json()
        return states

    deadline = time.monotonic() + 60
    while True:
        states = await finished()
        if all(body["state"] == "completed" for body in states.values()):
            break
        assert time.monotonic() < deadline, Counter(b["state"] for b in states.values())
        await asyncio.sleep(0.2)

    # Every job is on exactly one host, and both hosts got work.
    home = {}
    for job_id in job_ids:
        found = await where(hosts, job_id)
        assert len(found) == 1, (job_id, found)
        home[job_id] = found[0]
    spread = Counter(home.values())
    assert spread[0] > 0 and spread[1] > 0, spread

    # The other job routes reach the same host: they know the job (no 404).
    sample = job_ids[:20]
    for job_id in sample:
        async with session.get(f"{base}/joboutput/{job_id}/0") as resp:
            assert resp.status == 200 and resp.content_type == "image/png"
        async with session.post(f"{base}/canceljob/{job_id}/") as resp:
            assert resp.status == 409 and (await resp.json())["error"]["code"] == "job_finished"
        async with session.post(f"{base}/retryjob/{job_id}/") as resp:
            assert resp.status == 409 and (await resp.json())["error"]["code"] == "not_retryable"

    # Host-wide routes are per host, on each host's own port.
    for n in (0, 1):
        async with session.get(f"{per_host[n]}/gpus/") as resp:
            assert resp.status == 200 and len((await resp.json())["gpus"]) == 2
        async with session.get(f"{per_host[n]}/jobs/", params={"limit": "500"}) as resp:
            assert {j["job_id"] for j in (await resp.json())["jobs"]} == {
                j for j, h in home.items() if h == n}
    async with session.get(f"{base}/gpus/") as resp:
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "address_a_host"

    # Host 1 goes away: its jobs get a clear 502, host 0's still answer, and a new job
    # that belongs to host 1 is not created on host 0.
    await hosts[1].close()
    for job_id, n in home.items():
        async with session.get(f"{base}/jobstatus/{job_id}/") as resp:
            if n == 1:
                body = await resp.json()
                assert resp.status == 502 and body["error"]["code"] == "host_unavailable"
                assert resp.headers["Retry-After"] == "10"
            else:
                assert resp.status == 200 and (await resp.json())["state"] == "completed"
    refused = 0
    for n in range(40):
        async with session.put(f"{base}/startjob/late-{n}/", params={"GpuId": "auto"},
                               json=workflows.quick()) as resp:
            if resp.status == 502:
                refused += 1
                assert await where(hosts[:1], f"late-{n}") == []
            else:
                assert resp.status == 202
    assert 0 < refused < 40


async def test_behind_nginx_one_clients_wrong_keys_lock_out_that_client_alone(balancer):
    """nginx passes each client's address on in X-Forwarded-For, and the hosts believe
    it from nginx only: a client that guesses keys is held back alone, and what it
    writes in the header itself changes nothing."""
    _, _, _, per_host = balancer
    url = f"{per_host[0]}/gpus/"

    def client(address: str) -> aiohttp.ClientSession:
        # Other loopback addresses stand for other machines reaching the balancer.
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0)))

    async with client("127.0.0.2") as guesser, client("127.0.0.3") as other:
        for n in range(ATTEMPTS):
            async with guesser.get(url, headers={"X-API-Key": "wrong",
                                                 "X-Forwarded-For": f"198.51.100.{n}"}) as resp:
                assert resp.status == 401
        async with guesser.get(url, headers={"X-API-Key": KEY}) as resp:
            assert resp.status == 429
        async with other.get(url, headers={"X-API-Key": KEY}) as resp:
            assert resp.status == 200


def test_every_proxied_server_passes_the_client_address_on():
    conf = re.sub(r"#.*", "", (DEPLOY / "nginx" / "cylindria.conf").read_text())
    servers = [block for block in conf.split("\nserver {")[1:] if "proxy_pass" in block]
    assert len(servers) == 3
    for block in servers:
        assert "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;" in block
        assert "proxy_set_header Host $http_host;" in block
    # The unit listens on loopback, so the proxy it trusts is on loopback too.
    unit = (DEPLOY / "cylindria.service").read_text()
    proxies = re.search(r"^Environment=CYLINDRIA_TRUSTED_PROXIES=(\S+)$", unit,
                        re.MULTILINE).group(1)
    assert "--host 127.0.0.1" in unit and proxies == "127.0.0.1,::1"
    settings = load_settings({}, {"CYLINDRIA_TRUSTED_PROXIES": proxies})
    assert settings.trusted_proxies == ("127.0.0.1", "::1")


def test_the_systemd_units_pass_systemd_analyze(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here (package systemd)")
    # The units as shipped, with the service's binary where this checkout has it.
    cylindria = Path(sys.executable).parent / "cylindria"
    assert cylindria.exists()
    unit = (DEPLOY / "cylindria.service").read_text()
    assert "/opt/cylindria/.venv/bin/cylindria" in unit
    (tmp_path / "cylindria.service").write_text(
        unit.replace("/opt/cylindria/.venv/bin/cylindria", str(cylindria)))
    shutil.copy(DEPLOY / "comfyui@.service", tmp_path / "comfyui@.service")
    shutil.copy(DEPLOY / "comfyui@.service", tmp_path / "comfyui@3.service")
    for name in ("cylindria.service", "comfyui@.service", "comfyui@3.service"):
        done = subprocess.run([analyze, "verify", str(tmp_path / name)],
                              capture_output=True, text=True, timeout=60)
        output = done.stdout + done.stderr
        # Unknown keys and bad values are only warnings to systemd: fail on them too.
        assert done.returncode == 0 and not re.search(
            r"Unknown|Failed|ignoring|not executable|Invalid", output), output
    for option in ("User=cylindria", "StateDirectory=cylindria", "EnvironmentFile=",
                   "Restart=on-failure", "NoNewPrivileges=yes", "ProtectSystem=strict",
                   "PrivateTmp=yes"):
        assert option in unit
    template = (DEPLOY / "comfyui@.service").read_text()
    assert "CUDA_VISIBLE_DEVICES=%i" in template and "$$((8188 + %i))" in template


def test_the_unit_and_the_container_start_cylindria_as_the_cli_expects():
    """Their command lines are ones `cylindria` accepts, with the state where the unit
    and the volume keep it."""
    unit = (DEPLOY / "cylindria.service").read_text()
    command = re.search(r"ExecStart=\S+ (.+?)\n(?!\s)", unit.replace("\\\n", " ")).group(1)
    args = build_parser().parse_args(command.split())
    assert args.command == "serve" and str(args.state_file).startswith("/var/lib/cylindria/")
    recipe = (ROOT / "Containerfile").read_text()
    entry = re.search(r'^ENTRYPOINT \[(.+)\]$', recipe, re.MULTILINE).group(1)
    argv = [part.strip().strip('"') for part in entry.split(",")]
    assert argv[0] == "cylindria"
    assert build_parser().parse_args(argv[1:]).command == "serve"
    assert re.search(r"^USER cylindria$", recipe, re.MULTILINE)
    assert 'VOLUME ["/var/lib/cylindria"]' in recipe
    assert "CYLINDRIA_STATE_FILE=/var/lib/cylindria/" in recipe
    assert re.search(r"^HEALTHCHECK .*/readyz", recipe, re.MULTILINE | re.DOTALL)


def test_the_environment_file_template_does_not_start_until_its_key_is_replaced():
    """A copy of the template left as it is must not run with a key everyone knows."""
    values = dict(line.split("=", 1) for line in
                  (DEPLOY / "cylindria.env.example").read_text().splitlines()
                  if line and not line.startswith("#"))
    with pytest.raises(ConfigError, match="make a good one with"):
        check_api_key(values["CYLINDRIA_API_KEY"])
