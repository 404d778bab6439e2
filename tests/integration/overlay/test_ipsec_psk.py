"""Where the IPsec PSK comes from, against the stand-in server (real HTTP, the agent's keys)."""

from __future__ import annotations

from pathlib import Path

from netmanager.overlay.charon import PskSource
from tests.helpers.standin import StandIn


async def test_psk_from_env_then_server_then_last_copy(tmp_path: Path) -> None:
    s = StandIn()
    try:
        assert await PskSource(str(tmp_path), {**s.env(), "RANCHER_IPSEC_PSK": "from-env"}).get() == "from-env"
        (tmp_path / "psk.txt").write_text("last-copy\n")
        src = PskSource(str(tmp_path), s.env())
        got = await src.get()
        if src.fetched:  # the server answered configcontent/psk: its secret is kept for the next start
            assert got and (tmp_path / "psk.txt").read_text().strip() == got
        else:            # it did not: the last copy is used and kept, nothing is lost
            assert got == "last-copy" and (tmp_path / "psk.txt").read_text() == "last-copy\n"
        # no copy yet: the server's secret when it has one, else nothing (the backend then reports "no PSK")
        assert await PskSource(str(tmp_path / "empty"), s.env()).get() == (got if src.fetched else "")
    finally:
        s.stop()
