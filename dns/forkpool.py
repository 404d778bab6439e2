"""An :class:`~concurrent.futures.Executor` that runs each call in a child forked for it.

The child starts as a copy-on-write image of the daemon, so the call's arguments (the table being
served, the tree) are neither pickled nor copied on the way in; the result comes back pickled
through a pipe, and the child exits. Nothing stays between calls: a resident helper process (a
spawned interpreter with its own imports and data, plus multiprocessing's resource tracker) cost
dns 43 MB all the time at 1,000 containers, more than the daemon's own tables and caches.

The child never touches the parent's event loop: signals back to their defaults, the loop's
wakeup fd detached, garbage collection off, niced (serving wins the CPU), killed with the parent
and after ``limit`` seconds (``alarm``), so a call that hangs (a stuck download) ends as an error
instead of holding the daemon's rebuilds forever. A thread per call waits for the pipe and reaps
the child (a blocking read, the one thing it does). A child that dies without a result fails the
call with :class:`ChildProcessError` (an ``OSError``, which the metadata watch retries).
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import signal
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

from agents.children import die_with_parent

__all__ = ["ForkPool"]


class ForkPool(Executor):
    def __init__(self, limit: float = 120.0) -> None:
        self.limit = limit

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child exits inside (its coverage is not collected)
            os.close(r)
            _child(w, self.limit, fn, args, kwargs)
        os.close(w)
        threading.Thread(target=_wait, args=(fut, pid, r), name=f"fork-{pid}", daemon=True).start()
        return fut


def _child(w: int, limit: float, fn: Callable[..., Any], args: Any, kwargs: Any) -> None:
    try:
        signal.set_wakeup_fd(-1)  # a signal here must not wake the parent's loop
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
            signal.signal(sig, signal.SIG_DFL)
        gc.disable()
        die_with_parent()
        with contextlib.suppress(OSError):
            os.nice(10)
        signal.alarm(max(1, int(limit)))
        try:
            res: tuple[bool, Any] = (True, fn(*args, **kwargs))
        except BaseException as e:
            res = (False, e)
        try:
            data = pickle.dumps(res, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:  # an unpicklable exception or result
            data = pickle.dumps((False, RuntimeError(f"{type(e).__name__}: {e}")))
        view = memoryview(data)
        while view:
            view = view[os.write(w, view):]
    finally:
        os._exit(0)


def _wait(fut: Future[Any], pid: int, r: int) -> None:
    chunks = []
    try:
        while b := os.read(r, 1 << 20):
            chunks.append(b)
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    try:
        ok, val = pickle.loads(b"".join(chunks)) if chunks else (False, None)
    except Exception as e:
        ok, val = False, ChildProcessError(f"unreadable result from child {pid}: {e}")
    if val is None and not ok:
        how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else \
            f"exit {os.waitstatus_to_exitcode(status)}"
        val = ChildProcessError(f"child {pid} died without a result ({how})")
    if ok:
        fut.set_result(val)
    else:
        fut.set_exception(val)
