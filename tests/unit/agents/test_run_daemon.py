import asyncio
import json
import os

import pytest

from agents.cli import run_daemon
from agents.errors import ConfigError


@pytest.fixture(autouse=True)
def _restore_loop_policy():
    policy = asyncio.get_event_loop_policy()
    yield
    asyncio.set_event_loop_policy(policy)


def test_crash_is_logged_as_json_and_exits_1(tmp_path):
    log = tmp_path / "d.log"

    async def serve(stop: asyncio.Event) -> None:
        raise RuntimeError("kaboom")

    assert run_daemon("unit", serve, log_file=str(log), log_json=True) == 1
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    crash = next(r for r in recs if r["event"] == "daemon crashed")
    assert crash["error"] == "kaboom" and crash["error_type"] == "RuntimeError" and "exception" in crash


def test_config_error_exits_2_with_a_plain_message(tmp_path, capsys):
    async def serve(stop: asyncio.Event) -> None:
        raise ConfigError("--listen: bad port")

    assert run_daemon("unit", serve, log_file=str(tmp_path / "d.log")) == 2
    assert "unit: --listen: bad port" in capsys.readouterr().err


def test_signal_sets_stop_and_pid_file_is_removed(tmp_path):
    pid = tmp_path / "d.pid"
    seen = []

    async def serve(stop: asyncio.Event) -> None:
        seen.append(pid.read_text().strip())
        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), 15)
        await asyncio.wait_for(stop.wait(), 5)

    assert run_daemon("unit", serve, log_file=str(tmp_path / "d.log"), pid_file=str(pid)) == 0
    assert seen == [str(os.getpid())] and not pid.exists()
