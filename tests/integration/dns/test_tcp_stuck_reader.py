"""A TCP client that sends queries and never reads the answers must not hold its connection
(and one of the limited TCP slots) forever."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
from pathlib import Path

import pytest

from tests.helpers.wait import until
from tests.integration.dns.conftest import make_q, start_dns

pytestmark = pytest.mark.timeout(60)


def established(port: int, client_port: int) -> bool:
    out = subprocess.run(["ss", "-Htn", "state", "established", f"( sport = :{port} and dport = :{client_port} )"],
                         capture_output=True, text=True, check=True).stdout
    return bool(out.strip())


def test_tcp_client_that_never_reads_is_dropped(tmp_path: Path) -> None:
    # one name with a 3,900-address A set: each TCP answer is ~62 KB
    f = tmp_path / "answers.json"
    ips = [f"10.9.{i // 250}.{i % 250 + 1}" for i in range(3900)]
    f.write_text(json.dumps({"default": {"a": {"big.rancher.internal.": {"answer": ips}}}}))
    d = start_dns("--answers", str(f), recursers=["127.0.0.1:9"])
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # tiny window: the server's writes back up
        s.connect(("127.0.0.1", d.port))
        cport = s.getsockname()[1]
        q = make_q("big.rancher.internal.", edns=False).pack()
        s.sendall((struct.pack("!H", len(q)) + q) * 128)  # ~8 MB of answers, none of them read
        assert established(d.port, cport)
        # the server gives up on a peer that takes nothing for its idle timeout (8 s)
        until(lambda: not established(d.port, cport), what="server dropping the peer that never reads",
              interval=0.2)
        s.close()
        # and keeps answering
        r = d.ask("big.rancher.internal.", tcp=True)
        assert len(r.rr) == 3900
    finally:
        d.proc.stop()
