"""agents.children.run: short children run off the loop, output and status relayed."""

from __future__ import annotations

import asyncio

import pytest

from agents.children import run


def test_output_status_and_input_are_relayed() -> None:
    p = asyncio.run(run(["sh", "-c", "cat; echo oops >&2; exit 3"], input=b"hello\n", env={"PATH": "/usr/bin:/bin"}))
    assert (p.stdout, p.stderr, p.returncode) == (b"hello\n", b"oops\n", 3)


def test_the_loop_runs_while_the_child_does() -> None:
    async def go() -> int:
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0)

        t = asyncio.create_task(ticker())
        p = await run(["sh", "-c", "read x; echo $x"], input=b"go\n")  # the child waits for nothing but stdin
        done.set()
        await t
        assert p.stdout == b"go\n"
        return ticks

    assert asyncio.run(go()) > 1


def test_timeout_kills_and_missing_binary_raises() -> None:
    with pytest.raises(TimeoutError, match="did not finish"):
        asyncio.run(run(["sleep", "30"], timeout=0.2))
    with pytest.raises(FileNotFoundError):
        asyncio.run(run(["/nonexistent/corral-no-such-binary"]))
