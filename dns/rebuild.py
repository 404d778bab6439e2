"""Table rebuilds off the event loop: parse, build and diff in a child; apply a small diff here.

Why another process (measured, bench/RESULTS.md "core"): at 5,000 containers the tree is 16.8 MB
of JSON; parsing it holds the GIL for hundreds of ms and :func:`dns.table.build` takes ~0.5 s,
which on the daemon's loop would stall every query. The metadata watch
(agents/metadata_watch.py) downloads in a child of dns's :class:`dns.forkpool.ForkPool` and
persists the tree to its state file; :func:`build_from_state` then runs in another child forked
for the rebuild: it reads that tree, builds the new :class:`~dns.table.Table` with the pure
:func:`dns.table.build`, compares it with the table the daemon serves (the child's
copy-on-write image of it) and returns a :class:`Diff` of what changed (names, views, PTRs).
The daemon copies its dicts (C-speed) and applies the diff, so a one-container change costs
microseconds on the loop, and a full first load one unpickle.

Why children forked per call and not one resident helper: at 1,000 containers the spawned helper
and multiprocessing's resource tracker cost 43 MB beside a 46 MB daemon, all the time; a fork costs
a few milliseconds per call and nothing in between. The price is a second parse of the tree (the
download's child is gone when the build's starts), in a child, off the loop.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field, replace
from typing import Any

from agents.metadata_fetch import FetchError, read_tree
from dns.table import Rec, Settings, Table, View, build

__all__ = ["Diff", "FetchError", "apply", "build_from_state", "build_tree_diff", "diff", "dump_answers"]


@dataclass(frozen=True)
class Diff:
    base: int                                  # generation it applies to (0: full)
    generation: int
    version: str
    ttl: int
    ndots: int
    default_search: tuple[str, ...]
    default_recurse: tuple[str, ...]
    reverse_zones: tuple[str, ...]
    set_default: dict[str, Rec] = field(default_factory=dict)
    del_default: tuple[str, ...] = ()
    set_views: dict[str, View] = field(default_factory=dict)
    del_views: tuple[str, ...] = ()
    set_ptr: dict[str, str] = field(default_factory=dict)
    del_ptr: tuple[str, ...] = ()
    changed: bool = True
    dump_error: str = ""                       # the answers file could not be written (previous one kept)

    def size(self) -> int:
        return (len(self.set_default) + len(self.del_default) + len(self.set_views) + len(self.del_views)
                + len(self.set_ptr) + len(self.del_ptr))


def _dict_diff(old: Any, new: Any) -> tuple[dict[Any, Any], tuple[Any, ...]]:
    sets = {k: v for k, v in new.items() if old.get(k) != v}
    dels = tuple(k for k in old if k not in new)
    return sets, dels


def diff(old: Table | None, new: Table) -> Diff:
    """What turns ``old`` into ``new`` (everything when ``old`` is None)."""
    common = dict(generation=new.generation, version=new.version, ttl=new.ttl, ndots=new.ndots,
                  default_search=new.default.search, default_recurse=new.default.recurse,
                  reverse_zones=new.reverse_zones)
    if old is None:
        return Diff(base=0, set_default=dict(new.default.records), set_views=dict(new.views), set_ptr=dict(new.ptr),
                    **common)  # type: ignore[arg-type]
    sd, dd = _dict_diff(old.default.records, new.default.records)
    sv, dv = _dict_diff(old.views, new.views)
    sp, dp = _dict_diff(old.ptr, new.ptr)
    changed = bool(sd or dd or sv or dv or sp or dp or old.default.search != new.default.search
                   or old.default.recurse != new.default.recurse or old.reverse_zones != new.reverse_zones
                   or old.ttl != new.ttl or old.ndots != new.ndots)
    return Diff(base=old.generation, set_default=sd, del_default=dd, set_views=sv, del_views=dv, set_ptr=sp,
                del_ptr=dp, changed=changed, **common)  # type: ignore[arg-type]


def apply(old: Table | None, d: Diff) -> Table:
    """Build the new table from ``old`` and ``d`` (``old`` is left untouched)."""
    if d.base == 0 or old is None:
        records: dict[str, Rec] = {}
        views: dict[str, View] = {}
        ptr: dict[str, str] = {}
    else:
        if old.generation != d.base:
            raise ValueError(f"diff for generation {d.base} cannot apply to {old.generation}")
        records = dict(old.default.records)
        views = dict(old.views)
        ptr = dict(old.ptr)
    for k in d.del_default:
        records.pop(k, None)
    records.update(d.set_default)
    for k in d.del_views:
        views.pop(k, None)
    views.update(d.set_views)
    for k in d.del_ptr:
        ptr.pop(k, None)
    ptr.update(d.set_ptr)
    default = View(search=d.default_search, recurse=d.default_recurse, records=records)
    return Table(version=d.version, default=default, views=views, ptr=ptr, reverse_zones=d.reverse_zones,
                 generation=d.generation, ttl=d.ttl, ndots=d.ndots)


# ---------------------------------------------------------------- the rebuild child


def build_tree_diff(old: Table | None, tree: dict[str, Any], settings: Settings, generation: int,
                    dump: str = "") -> Diff:
    """Build ``tree``'s table and diff it against ``old``, the table the daemon serves; ``dump``:
    also write the new table there as a rancher-dns answers file when it changed."""
    settings = resolve_agent_ip(settings, tree)
    new = build(tree, settings, generation)
    d = diff(old, new)
    if dump and d.changed:
        err = dump_answers(new, dump)
        if err:
            d = replace(d, dump_error=err)
    return d


def build_from_state(old: Table | None, path: str, settings: Settings, generation: int, dump: str = "") -> Diff:
    """Run in a child forked for this rebuild (:class:`dns.forkpool.ForkPool`): the tree the
    metadata watch persisted at ``path``, built and diffed against ``old`` (shared with the
    daemon copy-on-write, not pickled)."""
    return build_tree_diff(old, read_tree(path), settings, generation, dump)


def dump_answers(table: Table, path: str) -> str:
    """Write ``table`` as a rancher-dns answers file (correct ``authoritative`` spelling).

    Atomic: written to ``<path>.tmp`` and renamed over ``path``. On failure (disk full, no
    permission) the temporary file is removed, the previous file stays as it was, and the
    error is returned for the daemon to log ("" on success)."""
    def view(v: View, default: bool) -> dict[str, Any]:
        d: dict[str, Any] = {"search": list(v.search), "recurse": list(v.recurse)}
        d["a"] = {k: {"answer": list(r.a)} for k, r in sorted(v.records.items()) if r.cname is None}
        d["cname"] = {k: {"answer": r.cname} for k, r in sorted(v.records.items()) if r.cname is not None}
        if default:
            d["authoritative"] = ["rancher.internal"]
        return d

    out = {"default": view(table.default, True), **{k: view(v, False) for k, v in sorted(table.views.items())}}
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return f"{e.strerror or e} ({tmp})"
    return ""


def resolve_agent_ip(st: Settings, tree: dict[str, Any]) -> Settings:
    """Replace the ``agent_ip`` placeholder of the original's flags with this host's address."""
    me = tree.get("self") if isinstance(tree.get("self"), dict) else {}
    host = me.get("host") if isinstance(me, dict) and isinstance(me.get("host"), dict) else {}
    agent_ip = str(host.get("agent_ip") or "") if isinstance(host, dict) else ""
    md = tuple(x for x in (agent_ip if v == "agent_ip" else v for v in st.rancher_metadata_answer) if x)
    never = tuple(x for x in (agent_ip if v == "agent_ip" else v for v in st.never_recurse_to) if x)
    rec = tuple(r for r in st.default_recurse if r.rpartition(":")[0] not in never)
    return replace(st, rancher_metadata_answer=md, never_recurse_to=never, default_recurse=rec)
