"""The batched netlink writer in a throw-away namespace: every entry answered on its own."""

from __future__ import annotations

import json
import sys

import pytest

from tests.helpers.netns import netns, requires_root, run_in_netns
from tests.helpers.procs import ROOT

pytestmark = [pytest.mark.root, requires_root]

SCRIPT = """
import json, socket
from netmanager.overlay import nl
n = nl.Netlink()
run = lambda *a: __import__("subprocess").run(a, check=True)
run("ip", "link", "add", "vtep1042", "type", "vxlan", "id", "1042", "dstport", "4789", "nolearning")
run("ip", "link", "set", "vtep1042", "up")
idx = socket.if_nametoindex("vtep1042")
mac = "0e:00:0a:2a:02:02"
ops = [nl.neigh_op(True, "10.42.2.10", mac, idx),
       nl.route_op(True, "10.42.2.10/32", 99999),          # no such device: this one fails
       nl.route_op(True, "10.42.2.11/32", idx),
       nl.fdb_op(True, mac, "192.0.2.2", idx),
       nl.route_op(False, "10.42.9.9/32", idx)]            # already gone: counts as done
first = n.batch(ops)
again = n.batch([o for i, o in enumerate(ops) if i != 1])
# entries of another VXLAN device are not the VTEP's
run("ip", "link", "add", "other", "type", "vxlan", "id", "7", "dstport", "4789", "nolearning")
run("ip", "link", "set", "other", "up")
oidx = socket.if_nametoindex("other")
assert n.batch([nl.neigh_op(True, "10.42.3.10", mac, oidx), nl.route_op(True, "10.42.3.10/32", oidx),
                nl.fdb_op(True, mac, "192.0.2.3", oidx)]) == ["", "", ""]
run("ip", "route", "add", "10.42.4.0/24", "via", "10.42.2.10", "dev", "vtep1042", "onlink")  # made by hand
subnet = n.batch([nl.route_op(True, "10.42.5.0/24 via 10.42.2.10", idx)])  # the per-host-subnet route
state = n.read_vtep(idx)
n._s().strict = False   # an older kernel: full dumps, filtered here
loose = n.read_vtep(idx)
print(json.dumps({"first": first, "again": again, "subnet": subnet, "fdb": sorted(state.fdb), "neigh": dict(state.neigh),
                  "routes": sorted(state.routes), "same_unfiltered": loose == state, "loose": repr(loose)}))
"""


def test_one_failing_entry_never_stops_the_others_and_read_back_sees_only_the_vtep() -> None:
    with netns("ovnl") as ns:
        out = run_in_netns(ns, "env", f"PYTHONPATH={ROOT}", sys.executable, "-c", SCRIPT).stdout
    r = json.loads(out)
    assert [bool(e) for e in r["first"]] == [False, True, False, False, False]
    assert "No such device" in r["first"][1]
    assert r["again"] == ["", "", "", ""]  # replace/append/delete-if-present: repeating is harmless
    assert r["fdb"] == [["0e:00:0a:2a:02:02", "192.0.2.2"]]
    assert r["neigh"] == {"10.42.2.10": "0e:00:0a:2a:02:02"}
    assert r["subnet"] == [""]
    # gateway routes on the VTEP are read back with their gateway (stray ones are removed as such)
    assert r["routes"] == ["10.42.2.11/32", "10.42.4.0/24 via 10.42.2.10", "10.42.5.0/24 via 10.42.2.10"]
    assert r["same_unfiltered"], r["loose"]
