"""The slice of ``os`` the plugins use, on the built-in ``posix`` module: importing ``os`` costs
~1.7 ms of CPU per call (posixpath, _collections_abc, the environ mapping), a tenth of a whole
reference ADD. Modules use it as ``from . import _os as os``.

In a process that has imported ``os`` already (a test, a caller embedding the plugins) the real
``os.environ`` is used, so changes made through it are seen here too.
"""

from __future__ import annotations

import posix
import sys
from posix import (  # noqa: F401 (re-exported)
    O_CLOEXEC,
    O_CREAT,
    O_EXCL,
    O_RDONLY,
    O_RDWR,
    O_TRUNC,
    O_WRONLY,
    X_OK,
    _exit,
    access,
    close,
    listdir,
    mkdir,
    open,  # os.open (this module never needs the builtin)
    read,
    stat,
    strerror,
    unlink,
    urandom,
    write,
)

sep = "/"
pathsep = ":"

if "os" in sys.modules:
    environ: dict[str, str] = sys.modules["os"].environ  # type: ignore[assignment]
else:
    _fs = sys.getfilesystemencoding()
    environ = {k.decode(_fs, "surrogateescape"): v.decode(_fs, "surrogateescape") for k, v in posix.environ.items()}

_S_IFMT, _S_IFDIR, _S_IFREG = 0o170000, 0o040000, 0o100000


def join(a: str, *parts: str) -> str:
    """``os.path.join`` for str paths."""
    path = a
    for p in parts:
        if p.startswith("/"):
            path = p
        elif not path or path.endswith("/"):
            path += p
        else:
            path += "/" + p
    return path


def dirname(p: str) -> str:
    head = p[:p.rfind("/") + 1]
    return head.rstrip("/") or head


def _mode(p: str) -> int:
    try:
        return stat(p).st_mode & _S_IFMT
    except (OSError, ValueError):
        return 0


def isdir(p: str) -> bool:
    return _mode(p) == _S_IFDIR


def isfile(p: str) -> bool:
    return _mode(p) == _S_IFREG


def makedirs(path: str, mode: int = 0o777, exist_ok: bool = False) -> None:
    """``os.makedirs``: create ``path`` and any missing parents."""
    try:
        mkdir(path, mode)
    except FileNotFoundError:
        parent = dirname(path)
        if not parent or parent == path:
            raise
        makedirs(parent, mode, exist_ok=True)
        mkdir(path, mode)
    except FileExistsError:
        if not exist_ok or not isdir(path):
            raise
