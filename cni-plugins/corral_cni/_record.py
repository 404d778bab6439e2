"""A dataclass stand-in for the plugin path: ``dataclasses`` pulls in ``inspect`` (and ast, dis,
tokenize...), several ms per call. Type checkers see the real ``dataclass`` (see the modules'
``TYPE_CHECKING`` imports); at run time this builds a plain ``__init__`` from the annotations."""

from __future__ import annotations

_MISSING = object()


def record(cls=None, /, **_opts):  # type: ignore[no-untyped-def]
    def wrap(c):  # type: ignore[no-untyped-def]
        names = tuple(c.__dict__.get("__annotations__", {}))  # noqa: RUF063 (no inspect here)
        defaults = {n: c.__dict__[n] for n in names if n in c.__dict__}

        def __init__(self, *args, **kw):  # type: ignore[no-untyped-def]
            if len(args) > len(names):
                raise TypeError(f"{c.__name__}: too many arguments")
            for n, v in zip(names, args, strict=False):
                object.__setattr__(self, n, v)
            for n in names[len(args):]:
                v = kw.pop(n, _MISSING)
                if v is _MISSING:
                    v = defaults.get(n, _MISSING)
                    if v is _MISSING:
                        raise TypeError(f"{c.__name__}: missing argument {n!r}")
                object.__setattr__(self, n, v)
            if kw:
                raise TypeError(f"{c.__name__}: unexpected arguments {sorted(kw)}")

        def __eq__(self, other):  # type: ignore[no-untyped-def]
            if type(other) is not type(self):
                return NotImplemented
            return all(getattr(self, n) == getattr(other, n) for n in names)

        def __repr__(self):  # type: ignore[no-untyped-def]
            return f"{c.__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n in names)})"

        c.__init__ = __init__
        c.__eq__ = __eq__
        c.__repr__ = __repr__
        c.__hash__ = None
        return c

    return wrap if cls is None else wrap(cls)
