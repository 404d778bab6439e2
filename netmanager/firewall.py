"""Applies a :class:`Ruleset` through the iptables adapter, writing only what differs.

The applier keeps a model of the kernel's owned chains and hook chains (what it last read or
wrote). A new desired state from metadata is diffed against that model, so a one-port change
writes the changed chains without first dumping 25k rules; a *suspected* drift (the verify
timer, or the backend's change probe moving under us, see :meth:`RulesApplier.moved`) reads
the kernel back with ``iptables-save`` first. Nothing differs -> nothing is written. Repairs
are at least ``min_repair_gap`` apart and logged with the diff.

The probe's value is kept as a baseline: taken just before each read-back, and after each of
our writes when the probe moved only as that write explains (nft: one generation per table
committed; legacy: only the tables written changed). Otherwise the baseline stays behind, so
the next probe sees the move and the kernel is read back.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from agents.errors import CorralError
from agents.log import get_logger
from agents.metrics import counter, gauge, histogram
from netmanager.desired import Rule, Ruleset, stale_flows
from netmanager.iptables import Backend
from netmanager.netlink import delete_flows
from netmanager.rules import Drift, Tables, diff, hook_chains, is_ours, parse_save, render_payload

__all__ = ["RulesApplier"]

log = get_logger(__name__)
_WRITES = counter("netmanager", "iptables_writes", "iptables-restore runs", ["reason"])
_REPAIRS = counter("netmanager", "rule_repairs", "Drifted chains and hooks found in the kernel and repaired",
                   ["what"])
_CHECKS = counter("netmanager", "verify_reads", "iptables-save read-backs")
_PROBES = counter("netmanager", "change_probes", "Ruleset change probes (nft generation id, legacy table sizes)",
                  ["result"])
_APPLY = histogram("netmanager", "apply_seconds", "Ruleset apply latency (diff + restore)", ["reason"],
                   buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
_RULES = gauge("netmanager", "rules", "Rules in the owned chains and hooks")
_FLOWS = counter("netmanager", "conntrack_deleted", "Conntrack flows to old host-port targets deleted")
_BAD_PORTS = gauge("netmanager", "bad_port_entries", "ports entries skipped as invalid")


def _model_after(rs: Ruleset, before: Tables, d: Drift) -> Tables:
    """The kernel's owned/hook chains after the payload for ``d`` ran (mirrors render_payload)."""
    after: Tables = {t: dict(chains) for t, chains in before.items()}
    for t, c, rules in rs.chains:
        after.setdefault(t, {})[c] = rules  # the tuple itself: the next diff compares and hashes it for free
    if d.create_policy:
        after.setdefault("filter", {}).setdefault("CATTLE_NETWORK_POLICY", [])
    for (t, c), want in hook_chains(rs).items():
        if (t, c) in d.hooks:
            old = after.setdefault(t, {}).get(c, [])
            after[t][c] = list(want) + [r for r in old if not is_ours(r)]
    return after


class RulesApplier:
    def __init__(self, backend: Backend, *, min_repair_gap: float = 1.0, conntrack: bool = True,
                 probe: bool = True) -> None:
        self.backend = backend
        self.probe = backend.probe() if probe else None
        self.baseline: Any = None
        self.conntrack = conntrack
        self.min_repair_gap = min_repair_gap
        self.model: Tables | None = None
        self._lines: dict[str, tuple[str, Rule]] = {}  # parse memo of the last read-back
        self.suspect = True  # read the kernel before the first write
        self.applied: Ruleset | None = None
        self.last_write = 0.0
        self.writes = 0
        self.repairs = 0
        self._reported: tuple[object, ...] = ()

    def suspect_drift(self) -> None:
        self.suspect = True

    async def _probe(self) -> Any:
        if self.probe is None:
            return None
        try:
            return await self.probe.read()
        except CorralError as e:
            log.warning("ruleset change probe failed", error=str(e))
            return None

    async def moved(self) -> bool:
        """Whether the ruleset changed since we last read or wrote it (the probe; cheap)."""
        if self.probe is None or self.model is None:
            return False
        writes, model = self.writes, self.model
        v = await self._probe()
        if v is None or writes != self.writes or model is not self.model:
            return False  # no answer, or our own write/read-back ran meanwhile: it set the baseline
        moved = bool(v != self.baseline)
        _PROBES.labels("moved" if moved else "same").inc()
        return moved

    def close(self) -> None:
        if self.probe is not None:
            self.probe.close()

    async def read(self) -> Tables:
        _CHECKS.inc()
        self.model = parse_save(await self.backend.save(), self._lines)
        return self.model

    async def apply(self, rs: Ruleset) -> None:
        t0 = time.monotonic()
        self._report_errors(rs)
        verifying = self.suspect or self.model is None
        self.suspect = False
        if verifying:
            self.baseline = await self._probe()  # before the read: a change during it moves the probe again
            tables: Tables = await self.read()
        else:
            assert self.model is not None
            tables = self.model
        d = diff(rs, tables)
        if not d:
            self.applied = rs
            return
        is_repair = verifying and self.applied == rs
        reason = "repair" if is_repair else ("boot" if self.applied is None else "change")
        if is_repair:
            gap = self.min_repair_gap - (time.monotonic() - self.last_write)
            if gap > 0:
                await asyncio.sleep(gap)
            log.warning("drift found, repairing", diff="\n".join(d.lines[:40]))
            _REPAIRS.labels("chain").inc(len(d.chains) + int(d.create_policy))
            _REPAIRS.labels("hook").inc(len(d.hooks))
            self.repairs += 1
        payload = render_payload(rs, tables, d)
        before = await self._probe()
        t_restore = time.monotonic()
        try:
            await self.backend.restore(payload)
        except Exception:
            self.model = None  # unknown now: read back before the next try
            raise
        t_restore = time.monotonic() - t_restore
        after = await self._probe()
        written = frozenset(ln[1:] for ln in payload.splitlines() if ln.startswith("*"))
        if (self.probe is not None and before is not None and after is not None
                and before == self.baseline and self.probe.ours(before, after, written)):
            self.baseline = after
        self.last_write = time.monotonic()
        previous = self.applied
        self.writes += 1
        _WRITES.labels(reason).inc()
        self.model = _model_after(rs, tables, d)
        self.applied = rs
        _RULES.set(rs.rule_count())
        _APPLY.labels(reason).observe(time.monotonic() - t0)
        if reason != "repair":
            log.info("rules applied", reason=reason, chains=len(d.chains), hooks=len(d.hooks),
                     rules=rs.rule_count(), read_back=verifying, lines=payload.count("\n"),
                     restore_seconds=round(t_restore, 3), seconds=round(time.monotonic() - t0, 3))
        if self.conntrack and previous is not None:
            await self._clean_conntrack(previous, rs)

    async def _clean_conntrack(self, old: Ruleset, new: Ruleset) -> None:
        """Right after the rules moved: drop the flows still going to the old targets (UDP above all:
        a stale flow keeps sending a client's datagrams to the old container, rancher/rancher#8207)."""
        flows = stale_flows(old.bindings, new.bindings)
        if not flows:
            return
        try:
            n = await delete_flows(flows, new.conntrack_exclude)
        except CorralError as e:
            log.warning("conntrack clean-up failed", error=str(e))
            return
        _FLOWS.inc(n)
        if n:
            log.info("stale conntrack flows deleted", flows=n, ports=[f"{f.daddr or '*'}:{f.dport}/{f.proto}"
                                                                   for f in flows][:20])

    def _report_errors(self, rs: Ruleset) -> None:
        key = tuple(rs.errors)
        _BAD_PORTS.set(len(rs.errors))
        if key != self._reported:
            for e in rs.errors:
                log.error("bad ports entry skipped", entry=e.key, reason=e.reason)
            self._reported = key
