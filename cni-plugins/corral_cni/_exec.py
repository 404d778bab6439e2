"""Run a helper program (iptables, a delegated IPAM plugin) without ``subprocess``: importing it
costs ~12 ms of CPU per call (locale, re, enum, threading, selectors, signal), more than a whole
reference ADD. ``posix_spawnp`` plus a ``poll`` loop over the three pipes is all that is needed.
"""

from __future__ import annotations

import _signal
import posix
import select

from . import _os as os

_CHUNK = 65536


def run(argv: list[str], data: bytes = b"", env: dict[str, str] | None = None) -> tuple[int, bytes, bytes]:
    """Run ``argv`` (searched in PATH) with ``data`` on stdin; return (exit status, stdout, stderr).
    A program that cannot be started raises ``OSError``; one killed by a signal returns -signal."""
    in_r, in_w = posix.pipe2(os.O_CLOEXEC)
    out_r, out_w = posix.pipe2(os.O_CLOEXEC)
    err_r, err_w = posix.pipe2(os.O_CLOEXEC)
    actions = [(posix.POSIX_SPAWN_DUP2, in_r, 0), (posix.POSIX_SPAWN_DUP2, out_w, 1),
               (posix.POSIX_SPAWN_DUP2, err_w, 2)]
    try:
        pid = posix.posix_spawnp(argv[0], argv, os.environ if env is None else env, file_actions=actions,
                                 setsigdef=(_signal.SIGPIPE, _signal.SIGXFSZ))
    except BaseException:
        for fd in (in_w, out_r, err_r):
            os.close(fd)
        raise
    finally:
        for fd in (in_r, out_w, err_w):
            os.close(fd)
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
    poller = select.poll()
    poller.register(out_r, select.POLLIN)
    poller.register(err_r, select.POLLIN)
    live = {out_r, err_r}
    view, off = memoryview(data), 0
    if data:
        posix.set_blocking(in_w, False)
        poller.register(in_w, select.POLLOUT)
        live.add(in_w)
    else:
        os.close(in_w)
    try:
        while live:
            for fd, _ev in poller.poll():
                if fd == in_w:
                    try:
                        off += os.write(in_w, view[off:off + _CHUNK])
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:
                        off = len(data)  # the program does not read (all of) it
                    if off >= len(data):
                        poller.unregister(in_w)
                        live.discard(in_w)
                        os.close(in_w)
                    continue
                chunk = os.read(fd, _CHUNK)
                if chunk:
                    chunks[fd].append(chunk)
                else:
                    poller.unregister(fd)
                    live.discard(fd)
                    os.close(fd)
    finally:
        for fd in live:
            os.close(fd)
        _, status = posix.waitpid(pid, 0)
    return posix.waitstatus_to_exitcode(status), b"".join(chunks[out_r]), b"".join(chunks[err_r])
