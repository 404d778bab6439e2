"""Applies a :class:`Ruleset` through the iptables adapter, writing only what differs.

The applier keeps a model of the kernel's owned chains and hook chains (what it last read or
wrote). A new desired state from metadata is diffed against that model, so a one-port change
writes the changed chains without first dumping 25k rules; a *suspected* drift (the verify
timer, or the backend's change probe moving under us, see :meth:`RulesApplier.moved`) reads
the kernel back with ``iptables-save`` first. Nothing differs -> nothing is written. Repairs
are at least ``min_repair_gap`` apart and logged with the diff.

The probe's value is kept as a baseline: taken just before each read-back, and after each of
our writes when the probe moved only as that write explains (nft: one generation per commit -
each table of an ``iptables-nft-restore``, or one rule-handle transaction; legacy: only the
tables written changed). Otherwise the baseline stays behind, so
the next probe sees the move and the kernel is read back.

nft backend: a change that only edits a few rules of owned chains (a port added, moved or
removed) is written by rule handle in one nf_tables transaction (:mod:`netmanager.nft`), not by
``iptables-nft-restore``, which would load every rule of the chains it edits first. The handles
are read after the ruleset settles (a background dump, once per generation the applier knows)
and kept in step by those transactions; they belong to the probe baseline, so anyone else's
write (the probe moves) sends the next change back to ``iptables-restore``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from agents.errors import CorralError
from agents.log import get_logger
from agents.metrics import counter, gauge, histogram
from netmanager.desired import OWNED_CHAINS, Rule, Ruleset, stale_flows
from netmanager.iptables import Backend
from netmanager.netlink import delete_flows
from netmanager.nft import MAX_EDITS, NftEdit, NftEditor, compilable
from netmanager.rules import Drift, Tables, chain_edit, diff, hook_chains, is_ours, parse_save, render_payload

__all__ = ["RulesApplier"]

log = get_logger(__name__)
_WRITES = counter("netmanager", "iptables_writes", "iptables-restore runs", ["reason"])
_REPAIRS = counter("netmanager", "rule_repairs", "Drifted chains and hooks found in the kernel and repaired",
                   ["what"])
_CHECKS = counter("netmanager", "verify_reads", "iptables-save read-backs")
_DIGESTS = counter("netmanager", "verify_digests",
                   "Periodic legacy digests of the rules (counters aside) vs the last read-back: same or moved",
                   ["result"])
_PROBES = counter("netmanager", "change_probes", "Ruleset change probes (nft generation id, legacy table sizes)",
                  ["result"])
_APPLY = histogram("netmanager", "apply_seconds", "Ruleset apply latency (diff + write)", ["reason"],
                   buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
_RULES = gauge("netmanager", "rules", "Rules in the owned chains and hooks")
_FLOWS = counter("netmanager", "conntrack_deleted", "Conntrack flows to old host-port targets deleted")
_HANDLE_EDITS = counter("netmanager", "handle_edits",
                        "Changes written by nf_tables rule handle in one transaction (nft backend)", ["result"])
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
                 probe: bool = True, handle_edits: bool = True) -> None:
        self.backend = backend
        self.probe = backend.probe() if probe else None
        self.nft = NftEditor(backend.restore_cmd) if (
            handle_edits and backend.name == "nft" and self.probe is not None) else None
        self.handles: dict[tuple[str, str], list[int]] | None = None
        self.handles_at: Any = None  # the probe baseline the handles belong to
        self._loading: asyncio.Task[None] | None = None
        self._handles_tried: Any = None
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
        self._verified: tuple[bytes, int] | None = None  # (digest before the last read-back, writes then)

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
        if self._loading is not None:
            self._loading.cancel()
        if self.probe is not None:
            self.probe.close()
        if self.nft is not None:
            self.nft.close()

    def _want_handles(self) -> None:
        """Start reading the owned chains' rule handles when the ones held are not of the
        ruleset the applier knows (off the change path: a background dump)."""
        if (self.nft is None or self.baseline is None or self.model is None
                or (self.handles is not None and self.handles_at == self.baseline)
                or (self._loading is not None and not self._loading.done())
                or self._handles_tried == self.baseline):  # once per generation, even if it failed
            return
        self._handles_tried = self.baseline
        self._loading = asyncio.get_running_loop().create_task(self._load_handles(self.baseline))

    async def _load_handles(self, at: Any) -> None:
        assert self.nft is not None
        try:
            gens, handles = await self.nft.handles(OWNED_CHAINS)
            now = await self._probe()
        except CorralError as e:
            log.info("rule handles not read", error=str(e))
            return
        model = self.model
        if (now != at or self.baseline != at or model is None or not gens <= {int(at) & 0xFFFF}
                or any(len(model.get(t, {}).get(c, ())) != len(h) for (t, c), h in handles.items())):
            if self.baseline != at:  # our own write meanwhile: read those of the ruleset it left
                asyncio.get_running_loop().call_soon(self._want_handles)
            return  # otherwise someone else's: read again once the applier knows the ruleset again
        self.handles, self.handles_at = handles, at

    async def unchanged(self) -> bool:
        """For the periodic verify: the kernel's rules are those of the last read-back and we
        have not written since (legacy: the tables' digest), so reading them back can be skipped.
        False when that cannot be told (nft: its probe needs no such check)."""
        if self.probe is None or self._verified is None or self.model is None or self.writes != self._verified[1]:
            return False
        digest, writes = self._verified
        try:
            now = await self.probe.digest()
        except CorralError as e:
            log.warning("ruleset digest failed", error=str(e))
            return False
        if now is None or writes != self.writes:
            return False
        _DIGESTS.labels("same" if now == digest else "moved").inc()
        return now == digest

    async def read(self) -> Tables:
        _CHECKS.inc()
        digest = None
        if self.probe is not None:
            try:
                digest = await self.probe.digest()  # before the read: a change during it moves it again
            except CorralError as e:
                log.warning("ruleset digest failed", error=str(e))
        writes = self.writes
        self.model = parse_save(await self.backend.save(), self._lines)
        self._verified = (digest, writes) if digest is not None and writes == self.writes else None
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
            if verifying:  # the same rules: keep the wanted tuples, so later diffs compare by identity
                self.model = _model_after(rs, tables, d)
            self.applied = rs
            self._want_handles()
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
        if not verifying and await self._edit_by_handle(rs, tables, d, t0, reason):
            return
        payload = render_payload(rs, tables, d)
        self.handles = None
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
        await self._written(rs, tables, d, reason, t0, read_back=verifying, lines=payload.count("\n"),
                            restore_seconds=round(t_restore, 3))

    async def _written(self, rs: Ruleset, tables: Tables, d: Drift, reason: str, t0: float, **log_fields: Any) -> None:
        """After ``d`` was written either way: the model, counters and log, the next handle read,
        and the conntrack clean-up of a change."""
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
                     rules=rs.rule_count(), **log_fields, seconds=round(time.monotonic() - t0, 3))
        self._want_handles()
        if self.conntrack and previous is not None:
            await self._clean_conntrack(previous, rs)

    def _handle_edits(self, rs: Ruleset, tables: Tables, d: Drift) -> list[NftEdit] | None:
        """The drift as rule-handle edits, or None when it is not only a few rules of owned
        chains whose handles are held (hooks, a rebuild, a rule that cannot be moved)."""
        handles = self.handles
        if (self.nft is None or handles is None or self.handles_at != self.baseline
                or d.hooks or d.create_policy or not d.chains):
            return None
        edits = []
        for t, c in d.chains:
            have = tables.get(t, {}).get(c)
            hs = handles.get((t, c))
            if have is None or hs is None or len(hs) != len(have):
                return None
            e = chain_edit(rs.chain(t, c), have)
            if e is None or not all(compilable(r) for _, r in e[1]):
                return None
            edits.append(NftEdit(t, c, *e))
        if sum(len(e.gone) + len(e.new) for e in edits) > MAX_EDITS:
            return None
        return edits

    async def _edit_by_handle(self, rs: Ruleset, tables: Tables, d: Drift, t0: float, reason: str) -> bool:
        """Write ``d`` as one nf_tables transaction by rule handle (see the module doc); False
        when it does not fit or was refused (nothing written: the caller restores instead)."""
        edits = self._handle_edits(rs, tables, d)
        if edits is None or self.nft is None or self.handles is None:
            return False
        before = await self._probe()
        if before is None or before != self.baseline:
            return False  # someone else wrote since the handles were read
        t_write = time.monotonic()
        try:
            new = await self.nft.apply(edits, self.handles, {(e.table, e.chain): tables[e.table][e.chain] for e in edits},
                                       {(e.table, e.chain): rs.chain(e.table, e.chain) for e in edits})
        except CorralError as e:
            _HANDLE_EDITS.labels("refused").inc()
            log.warning("rule handle edit not applied, restoring instead", error=str(e))
            self.handles = None
            if self.nft.broken:
                log.warning("rule handle edits off", reason=self.nft.broken)
                self.nft.close()
                self.nft = None
            return False
        t_write = time.monotonic() - t_write
        _HANDLE_EDITS.labels("ok").inc()
        after = await self._probe()
        handles = {**self.handles, **new}
        if self.probe is not None and after is not None and self.probe.ours(before, after, frozenset(), commits=1):
            self.baseline = after
            self.handles, self.handles_at = handles, after
        else:
            self.handles = None
        await self._written(rs, tables, d, reason, t0, read_back=False,
                            by_handle=sum(len(e.gone) + len(e.new) for e in edits), restore_seconds=round(t_write, 3))
        return True

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
