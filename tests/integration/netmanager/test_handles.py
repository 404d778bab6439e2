"""nft rule-handle edits (netmanager/nft.py) against the real kernel, in a throw-away namespace:
a port moved to the middle of the chains, a transaction the kernel refuses (a stale handle), and a
foreign write since the handles were read. The applier runs in a child inside the namespace."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from tests.helpers.netns import netns, requires_root, run_in_netns
from tests.helpers.procs import ROOT

pytestmark = [requires_root, pytest.mark.root,
              pytest.mark.skipif(shutil.which("iptables-nft-restore") is None, reason="no iptables-nft")]

SCRIPT = r"""
import asyncio, json, subprocess
from netmanager.desired import HostFacts, desired_ruleset
from netmanager.firewall import RulesApplier, _HANDLE_EDITS
from netmanager.iptables import Backend
from netmanager.netlink import ensure_ipset
from netmanager.rules import diff, parse_save
from tests.helpers.wait import eventually
from tests.unit.netmanager.conftest import objects, snapshot_of

def count(result):
    return _HANDLE_EDITS.labels(result)._value.get()

def in_sync(rs):
    save = subprocess.run(["iptables-nft-save"], capture_output=True, text=True, check=True).stdout
    return not diff(rs, parse_save(save))

async def main():
    await ensure_ipset()
    a = RulesApplier(Backend.named("nft"), conntrack=False)
    objs = objects()
    web = next(o for o in objs if o.get("uuid") == "ctr-web-1")
    web["ports"] = [f"0.0.0.0:{8000 + 2 * k}:80/tcp" for k in range(40)]
    out = {}

    async def change(port):
        web["ports"][20] = f"0.0.0.0:{port}:80/tcp"
        rs = desired_ruleset(snapshot_of(objs), HostFacts())
        await a.apply(rs)
        return rs

    async def handles_read():
        await eventually(lambda: a.handles is not None and a.handles_at == a.baseline, what="rule handles read")

    await a.apply(desired_ruleset(snapshot_of(objs), HostFacts()))
    await handles_read()
    rs = await change(8013)  # between 8012 and 8014: inserted before a handle, 8040 deleted by handle
    out["middle"] = {"ok": count("ok"), "in_sync": in_sync(rs), "handles_kept": a.handles_at == a.baseline}

    key = ("nat", "CATTLE_PREROUTING")
    pos = next(i for i, r in enumerate(a.model["nat"]["CATTLE_PREROUTING"]) if "8013" in r)
    a.handles[key][pos] = 1 << 40  # a handle the kernel does not have: the transaction is refused
    rs = await change(8015)
    out["refused"] = {"refused": count("refused"), "ok": count("ok"), "in_sync": in_sync(rs)}

    await handles_read()
    subprocess.run(["iptables-nft", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "9", "-j", "ACCEPT"], check=True)
    rs = await change(8017)  # someone else wrote since the handles were read: iptables-restore
    out["foreign"] = {"ok": count("ok"), "refused": count("refused"), "in_sync": in_sync(rs)}
    a.close()
    print(json.dumps(out))

asyncio.run(main())
"""


def test_rule_handle_edits_and_their_fallbacks() -> None:
    with netns("nmh") as ns:
        run_in_netns(ns, "ip", "link", "add", "docker0", "type", "bridge")
        r = run_in_netns(ns, "env", f"PYTHONPATH={ROOT}", sys.executable, "-c", SCRIPT, check=False)
        assert r.returncode == 0, r.stderr[-3000:]
        out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["middle"] == {"ok": 1, "in_sync": True, "handles_kept": True}
    assert out["refused"] == {"refused": 1, "ok": 1, "in_sync": True}  # restored instead, nothing half-done
    assert out["foreign"] == {"ok": 1, "refused": 1, "in_sync": True}
