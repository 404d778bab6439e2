"""iptables text in and out, pure: parse ``iptables-save``, diff against a :class:`Ruleset`,
render one ``iptables-restore --noflush`` payload.

Comparison is on token tuples, never on raw strings: a line read back is split into tokens
and compared with the desired tuple (the original compared the text of ``iptables -S`` with a
hand-written string, which flapped when iptables printed the rule in its canonical form).

The payload rewrites only what differs: an owned chain where a few rules differ gets ``-D`` of
the rules that went and ``-I <pos>`` of the new ones (a one-port change at 5,000 ports writes a
handful of rules, not 25k; on nft the applier writes that edit by rule handle instead, from
:func:`chain_edit`'s positions); one that differs more is declared and rebuilt whole (``:CHAIN -``,
``-F CHAIN``, its rules); a built-in chain whose head is not our
hooks in order gets every copy of our jump rules deleted (``-D`` by spec) and the hooks
inserted at positions 1..n. Foreign rules are never touched: a foreign rule inserted above our
hooks ends up below them. ``CATTLE_NETWORK_POLICY`` is created when missing, never flushed (its
content belongs to the network-policy manager).
"""

from __future__ import annotations

import functools
import heapq
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

from netmanager.desired import OWNED_CHAINS, POLICY_CHAIN, Rule, Ruleset

__all__ = [
    "TABLES", "Drift", "Tables", "chain_edit", "diff", "hook_chains", "hook_positions", "is_ours", "jump_targets", "parse_save", "render", "render_payload",
]

TABLES = ("raw", "nat", "filter")
Tables = dict[str, dict[str, Sequence[Rule]]]  # table -> chain -> rules (chain present = exists)


def jump_targets() -> frozenset[str]:
    return frozenset({c for _, c in OWNED_CHAINS} | {POLICY_CHAIN[1]})


_OURS = jump_targets()


def _tokens(rest: str) -> Rule:
    return tuple(shlex.split(rest)) if ('"' in rest or "'" in rest) else tuple(rest.split())


def parse_save(text: str, memo: dict[str, tuple[str, Rule]] | None = None) -> Tables:
    """``iptables-save`` output -> {table: {chain: [rule tokens]}} (``-A CHAIN`` stripped).

    ``memo`` (line -> (chain, tokens)), kept by the caller between read-backs, makes a re-read
    of mostly unchanged rules a dictionary lookup per line; it is refilled with this text's lines."""
    tables: dict[str, dict[str, list[Rule]]] = {}
    cur: dict[str, list[Rule]] | None = None
    old = memo.copy() if memo else {}
    if memo is not None:
        memo.clear()
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        c = line[0]
        if c == "-" and cur is not None and line.startswith("-A "):
            hit = old.get(line)
            if hit is None:
                _, chain, *rest = line.split(" ", 2)
                hit = (chain, _tokens(rest[0]) if rest else ())
            if memo is not None:
                memo[line] = hit
            rules = cur.get(hit[0])
            if rules is None:
                rules = cur[hit[0]] = []
            rules.append(hit[1])
        elif c == ":" and cur is not None:
            cur.setdefault(line[1:].split(" ", 1)[0], [])
        elif c == "*":
            cur = tables.setdefault(line[1:].strip(), {})
        elif line.startswith("COMMIT"):
            cur = None
    return cast(Tables, tables)


def is_ours(rule: Rule) -> bool:
    for i, t in enumerate(rule):
        if t in ("-j", "-g") and i + 1 < len(rule):
            return rule[i + 1] in _OURS
    return False


def hook_chains(rs: Ruleset) -> dict[tuple[str, str], list[Rule]]:
    out: dict[tuple[str, str], list[Rule]] = {("filter", "FORWARD"): []}
    for h in rs.hooks:
        out.setdefault((h.table, h.chain), []).append(h.rule)
    return out


@dataclass
class Drift:
    """What differs between the kernel and a ruleset (empty = in sync)."""

    chains: list[tuple[str, str]] = field(default_factory=list)  # owned chains to rebuild
    hooks: list[tuple[str, str]] = field(default_factory=list)  # built-in chains to re-hook
    create_policy: bool = False
    lines: list[str] = field(default_factory=list)  # human-readable diff, for the log

    def __bool__(self) -> bool:
        return bool(self.chains or self.hooks or self.create_policy)


@functools.lru_cache(maxsize=1 << 15)  # the same rules are rendered on every full rebuild
def _body(rule: Rule) -> str:
    return " ".join(shlex.quote(t) if (" " in t or not t) else t for t in rule)


def render(chain: str, rule: Rule, op: str = "-A") -> str:
    return f"{op} {chain} {_body(rule)}" if rule else f"{op} {chain}"


_SETS: dict[int, tuple[tuple[Rule, ...], frozenset[Rule]]] = {}


def _rule_set(rules: Sequence[Rule]) -> frozenset[Rule]:
    """``frozenset(rules)``, remembered for the last few tuples (a Ruleset's chains, and the
    applier's model, which holds the tuples it wrote): hashing 10k rule tuples is most of a
    one-port change's Python time otherwise."""
    if not isinstance(rules, tuple):
        return frozenset(rules)
    hit = _SETS.get(id(rules))
    if hit is not None and hit[0] is rules:
        return hit[1]
    out = frozenset(rules)
    if len(_SETS) >= 16:  # a few applies' worth: older tuples must be free to go
        del _SETS[next(iter(_SETS))]
    _SETS[id(rules)] = (rules, out)
    return out


def _chain_diff(table: str, chain: str, want: tuple[Rule, ...], have: Sequence[Rule] | None,
                lines: list[str], limit: int = 5) -> None:
    if have is None:
        lines.append(f"{table}/{chain}: chain missing ({len(want)} rules wanted)")
        return
    hs, ws = _rule_set(have), _rule_set(want)
    missing, extra = ws - hs, hs - ws  # set arithmetic: the log line must not cost a pass per rule
    if not missing and not extra:
        lines.append(f"{table}/{chain}: same rules, wrong order or duplicates")
        return
    lines.append(f"{table}/{chain}: {len(missing)} missing, {len(extra)} unexpected")
    # the first few of each in token order: a pass over 10k rules to keep the chain's order would cost
    # more than the rest of a one-port change's diff
    lines += [f"  + {render(chain, r)}" for r in heapq.nsmallest(limit, missing)]
    lines += [f"  - {render(chain, r)}" for r in heapq.nsmallest(limit, extra)]


def diff(rs: Ruleset, tables: Tables) -> Drift:
    d = Drift()
    for table, chain, want in rs.chains:
        have = tables.get(table, {}).get(chain)
        if have is None or tuple(have) != want:
            d.chains.append((table, chain))
            _chain_diff(table, chain, want, have, d.lines)
    for (table, chain), want_hooks in hook_chains(rs).items():
        have = tables.get(table, {}).get(chain, [])
        ours = [r for r in have if is_ours(r)]
        n = len(want_hooks)
        if tuple(have[:n]) != tuple(want_hooks) or len(ours) != n:
            d.hooks.append((table, chain))
            d.lines.append(f"{table}/{chain}: hooks {[' '.join(r) for r in want_hooks]} not at 1..{n} "
                           f"(head: {[' '.join(r) for r in have[:n + 1]]})")
    if POLICY_CHAIN[1] not in tables.get(POLICY_CHAIN[0], {}):
        d.create_policy = True
        d.lines.append(f"{POLICY_CHAIN[0]}/{POLICY_CHAIN[1]}: chain missing")
    return d


def chain_edit(want: tuple[Rule, ...], have: Sequence[Rule]
               ) -> tuple[tuple[int, ...], tuple[tuple[int, Rule], ...]] | None:
    """(0-based indexes in ``have`` of the rules that go, (0-based position in ``want``, rule) of
    the new ones) turning ``have`` into ``want``, or None when a rebuild is simpler.

    Used when few rules differ and the rules both sides share are in the same order (true for a
    port added, removed or moved: the order key of every other binding is unchanged)."""
    hs = _rule_set(have)
    if not have or len(hs) != len(have):
        return None
    ws = _rule_set(want)
    gone_set, new_set = hs - ws, ws - hs
    if len(gone_set) + len(new_set) > max(4, len(want) // 8):
        return None  # decided on set sizes, before any pass over 25k rules
    # one walk along both: the rules they share are mostly the same objects (cached per binding),
    # so this costs a pointer comparison per rule and hashes only the few that differ
    gone: list[int] = []
    new: list[tuple[int, Rule]] = []
    i = j = 0
    nh, nw = len(have), len(want)
    while i < nh and j < nw:
        h, w = have[i], want[j]
        if h is w or h == w:
            i += 1
            j += 1
        elif h in gone_set:
            gone.append(i)
            i += 1
        elif w in new_set:
            new.append((j, w))
            j += 1
        else:
            return None  # shared rules in another order
    if any(have[k] not in gone_set for k in range(i, nh)) or any(want[k] not in new_set for k in range(j, nw)):
        return None
    gone += range(i, nh)
    new += ((k, want[k]) for k in range(j, nw))
    return tuple(gone), tuple(new)


def _edits(chain: str, want: tuple[Rule, ...], have: Sequence[Rule]) -> list[str] | None:
    """``-D``/``-I`` lines for :func:`chain_edit`'s edit, or None. Deletes go first; inserts in
    increasing position, so each position is final when it is used."""
    e = chain_edit(want, have)
    if e is None:
        return None
    gone, new = e
    out = [render(chain, have[i], "-D") for i in gone]
    out += [f"-I {chain} {i + 1} " + render(chain, r)[len(f"-A {chain} "):] for i, r in new]
    return out


def render_payload(rs: Ruleset, tables: Tables, drift: Drift | None = None) -> str:
    """One ``iptables-restore --noflush`` payload repairing ``drift`` (default: everything)."""
    if drift is None:
        drift = Drift(chains=[(t, c) for t, c, _ in rs.chains], hooks=list(hook_chains(rs)),
                      create_policy=POLICY_CHAIN[1] not in tables.get(POLICY_CHAIN[0], {}))
    fix_chains = set(drift.chains)
    fix_hooks = set(drift.hooks)
    hooks = hook_chains(rs)
    out: list[str] = []
    for table in TABLES:
        body: list[str] = []
        declared = tables.get(table, {})
        for t, chain, rules in rs.chains:
            if t != table:
                continue
            if chain in declared and (t, chain) in fix_chains:
                edits = _edits(chain, rules, declared[chain])
                if edits is not None:
                    body.extend(edits)
                    continue
            if (t, chain) in fix_chains or chain not in declared:
                body.append(f":{chain} - [0:0]")
                body.append(f"-F {chain}")
                body.extend(render(chain, r) for r in rules)
        if table == POLICY_CHAIN[0] and drift.create_policy:
            body.append(f":{POLICY_CHAIN[1]} - [0:0]")
        for (t, chain), want in hooks.items():
            if t != table or (t, chain) not in fix_hooks:
                continue
            for r in declared.get(chain, []):
                if is_ours(r):
                    body.append(render(chain, r, "-D"))
            for i, r in enumerate(want, 1):
                body.append(f"-I {chain} {i} " + render(chain, r)[len(f"-A {chain} "):])
        if body:
            out.append(f"*{table}")
            out.extend(body)
            out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


def hook_positions(tables: Tables) -> list[tuple[str, str, int, Rule]]:
    """(table, chain, 1-based position, rule) of every jump to one of our chains (tests, logs)."""
    out = []
    for table, chains in tables.items():
        for chain, rules in chains.items():
            if chain in _OURS:
                continue
            for i, r in enumerate(rules, 1):
                if is_ours(r):
                    out.append((table, chain, i, r))
    return out

