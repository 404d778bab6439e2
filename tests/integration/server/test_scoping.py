"""Agent keys act for their own agent only; the admin API wants a token off loopback and, once
given one, on every request (``corral ctl`` sends it)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from standin.ctl import AdminClient, CtlError
from tests.helpers.procs import ROOT
from tests.helpers.standin import StandIn
from tests.integration.server.conftest import basic

KEY_B = {"access": "agent-b", "secret": "secret-b", "role": "agent", "agentId": "2", "hostUuid": "host-b-uuid"}


async def _call(s: StandIn, method: str, path: str, key: tuple[str, str], body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession(headers=basic(*key)) as http:
        async with http.request(method, f"{s.url}{path}", json=body) as r:
            return r.status, await r.json(content_type=None)


async def test_agent_keys_act_for_their_own_agent_only(standin_factory: Callable[..., StandIn]) -> None:
    s = standin_factory(extra_keys=[KEY_B])
    s.ctl("host", "add", "--name", "node-a", "--uuid", "host-a-uuid", "--agent-ip", "127.0.2.1")
    s.ctl("host", "add", "--name", "node-b", "--uuid", "host-b-uuid", "--agent-ip", "127.0.2.2")
    c = s.ctl("container", "create", "--name", "web", "--host", "node-a", "--health-check", '{"port": 80}')
    a = (s.access_key, s.secret_key)
    b = (KEY_B["access"], KEY_B["secret"])
    rev = s.ctl("revision")["revision"]
    put = f"/configcontent/metadata-answers?client=v2&version={rev}-0000"
    # the applied version: one's own (agentId 1) yes, another agent's no
    assert (await _call(s, "PUT", put, a))[0] == 200
    status, body = await _call(s, "PUT", put + "&agentId=2", a)
    assert status == 403 and "agent" in body["message"]
    assert (await _call(s, "PUT", put + "&agentId=2", b))[0] == 200  # agent 2 itself may
    status, _ = await _call(s, "GET", "/configcontent/metadata-answers?client=v2&agentId=2", a)
    assert status == 403
    applied = {x["agent"]: x.get("appliedVersion") for x in s.ctl("config", "status")["items"]}
    assert applied.get("1") == rev and applied.get("2") == rev
    # health: a report names its reporter host; only that host's key may send it
    for host, key, want in (("host-b-uuid", a, 403), ("host-a-uuid", b, 403), ("host-a-uuid", a, 201),
                            ("host-b-uuid", b, 201)):
        status, body = await _call(s, "POST", "/serviceevents", key, {
            "externalTimestamp": int(time.time()), "healthcheckUuid": f"{host}_{c['uuid']}_1",
            "reportedHealth": "UP"})
        assert status == want, (host, key, body)
    assert sorted(e["data"]["reporter"] for e in s.ctl("reports", "--kind", "health")) == ["host-a-uuid",
                                                                                        "host-b-uuid"]
    # admin keys are not agents: they may act for anyone
    admin = (s.admin_access_key, s.admin_secret_key)
    assert (await _call(s, "PUT", put + "&agentId=2", admin))[0] == 200


def test_admin_api_off_loopback_needs_a_token(tmp_path: Any) -> None:
    base = [sys.executable, "-m", "agents.cli", "server", "--listen", "127.0.0.1:0", "--access-key", "k",
            "--secret-key", "s"]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    for addr in ("0.0.0.0:0", "[::]:0", "192.0.2.1:0"):
        out = subprocess.run([*base, "--admin-listen", addr], capture_output=True, text=True, env=env, timeout=30)
        assert out.returncode == 2 and "--admin-token" in out.stderr, (addr, out.stderr[-500:])


def test_admin_token_is_required_once_given(standin_factory: Callable[..., StandIn]) -> None:
    s = standin_factory(args=("--admin-token", "t0ken-1"))
    assert AdminClient(s.admin_url, token="t0ken-1").get("/_admin/revision")["revision"] >= 0
    for token in ("", "wrong"):
        with pytest.raises(CtlError) as e:
            AdminClient(s.admin_url, token=token).get("/_admin/revision")
        assert e.value.status == 401 and "admin token" in str(e.value)
    # corral ctl sends it (flag or CORRAL_ADMIN_TOKEN)
    ctl = [sys.executable, "-m", "agents.cli", "ctl", "--admin", s.admin_url]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    ok = subprocess.run([*ctl, "--admin-token", "t0ken-1", "revision"], capture_output=True, text=True, env=env,
                        timeout=60)
    assert ok.returncode == 0, ok.stderr
    ok = subprocess.run([*ctl, "revision"], capture_output=True, text=True, timeout=60,
                        env={**env, "CORRAL_ADMIN_TOKEN": "t0ken-1"})
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([*ctl, "revision"], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 1 and "admin token" in bad.stderr


