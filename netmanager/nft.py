"""Edits of big owned chains on the nft backend by rule handle, without a rule cache.

``iptables-nft`` must load every rule of a chain before it can delete a rule by its spec or
insert one at a position (``-D``/``-I N``): ~20k rules for a one-port change at 5,000 ports,
most of its time. nf_tables itself deletes by handle and inserts before a given handle, so an
edit of a few rules is done here in one nf_tables transaction (netlink batch, both tables
atomic together):

- the handles of our chains' rules are read once (one dump per chain, off the change path) and
  kept in step with the applier's model by our own edits (the transaction echoes the handles it
  gave); they belong to one ruleset generation, so any other writer invalidates them;
- a new rule is compiled by ``iptables-nft-restore`` itself, appended to an empty copy of its
  chain in a private scratch network namespace (no rule cache there), and its expressions are
  read back and sent unchanged, with the ``-p`` compat attribute iptables-nft sets: the kernel
  holds the same rule iptables-nft would have written, ``iptables-save`` prints it the same way.
  Rules whose expressions name per-namespace objects (``-m set``'s set index) are not taken;
  the applier writes those with ``iptables-restore``.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from agents.errors import TransportError
from netmanager.desired import Rule
from netmanager.nlattr import attr as _attr
from netmanager.nlattr import attrs
from netmanager.rules import render

__all__ = ["MAX_EDITS", "NftEdit", "NftEditor", "compilable"]


_NETLINK_NETFILTER = 12
_SUBSYS = 10  # NFNL_SUBSYS_NFTABLES
_NEWRULE, _GETRULE, _DELRULE = 6, 7, 8
_BATCH_BEGIN, _BATCH_END = 0x10, 0x11
_F_REQUEST, _F_ACK, _F_ECHO, _F_DUMP, _F_CREATE, _F_APPEND = 0x1, 0x4, 0x8, 0x300, 0x400, 0x800
_F_DUMP_INTR = 0x10
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NFPROTO_IPV4 = 2
_TABLE, _CHAIN, _HANDLE, _EXPRS, _COMPAT, _POSITION, _USERDATA = 1, 2, 3, 4, 5, 6, 7
_NESTED = 0x8000
_COMPAT_INV = 2  # NFT_RULE_COMPAT_F_INV
_HDR = struct.Struct("=IHHII")
_GEN = struct.Struct("=BBH")
_BE64 = struct.Struct(">Q")
_PROTOS = {"tcp": 6, "udp": 17, "icmp": 1, "sctp": 132}
# targets whose kernel data holds nothing tied to the namespace the rule was compiled in
_TARGETS = frozenset({"ACCEPT", "DROP", "RETURN", "MARK", "DNAT", "SNAT", "MASQUERADE", "CONNMARK"})
MAX_EDITS = 512  # rules deleted + inserted in one transaction; more go through iptables-restore, whose
# rule-cache load is then a small part of the write


def compilable(rule: Rule) -> bool:
    """Whether ``rule`` can be compiled in the scratch namespace and moved (see the module doc)."""
    if "set" in rule or "--match-set" in rule:
        return False
    for i, t in enumerate(rule):
        if t in ("-j", "-g"):
            return t == "-j" and i + 1 < len(rule) and rule[i + 1] in _TARGETS
        if t == "-p" and (i + 1 >= len(rule) or rule[i + 1] not in _PROTOS):
            return False
    return False


def _errno(data: memoryview, off: int) -> int:
    """The error number of the NLMSG_ERROR message at ``off`` (0: an acknowledgement)."""
    return int(-struct.unpack_from("=i", data, off + 16)[0])


def _str(s: str) -> bytes:
    return s.encode() + b"\0"


def _compat(rule: Rule) -> bytes:
    proto, inv = 0, False
    for i, t in enumerate(rule):
        if t == "-p" and i + 1 < len(rule):
            proto, inv = _PROTOS[rule[i + 1]], i > 0 and rule[i - 1] == "!"
            break
    return _attr(1, struct.pack(">I", proto)) + _attr(2, struct.pack(">I", _COMPAT_INV if inv else 0))


class _Socket:
    """One blocking NETLINK_NETFILTER socket (made in the calling thread's network namespace)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
        self.sock.settimeout(10.0)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)  # SO_RCVBUFFORCE: big dumps, many acks
            self.sock.setsockopt(socket.SOL_SOCKET, 32, 4 << 20)  # SO_SNDBUFFORCE: a batch is one message
        except OSError:
            pass
        self.sock.bind((0, 0))
        self.seq = 0
        self.buf = bytearray(1 << 16)  # the kernel sends at most 32 KiB a datagram

    def close(self) -> None:
        self.sock.close()

    def _msg(self, kind: int, flags: int, payload: bytes, family: int = _NFPROTO_IPV4, res: int = 0) -> tuple[bytes, int]:
        self.seq += 1
        body = _GEN.pack(family, 0, res) + payload
        return _HDR.pack(16 + len(body), kind, flags, self.seq, 0) + body, self.seq

    def _recv(self) -> memoryview:
        """One datagram, in the socket's own buffer (valid until the next call)."""
        n, _, flags, _ = self.sock.recvmsg_into([self.buf])
        if flags & socket.MSG_TRUNC:
            raise OSError(0, "netlink answer larger than the receive buffer")
        return memoryview(self.buf)[:n]

    def _answers(self) -> Iterator[tuple[int, int, int, memoryview, int, int]]:
        """The kernel's answers one netlink message at a time, datagram after datagram (reading
        on as long as the caller asks): (type, flags, seq, datagram, offset, length)."""
        while True:
            data = self._recv()
            off = 0
            while off < len(data):
                ln, kind, flags, seq, _ = _HDR.unpack_from(data, off)
                if ln < _HDR.size or off + ln > len(data):
                    raise OSError(0, f"malformed netlink message (length {ln} at {off} of {len(data)})")
                yield kind, flags, seq, data, off, ln
                off += (ln + 3) & ~3

    def dump(self, table: str, chain: str, exprs: bool) -> tuple[int, list[int], list[tuple[bytes, bytes]]]:
        """(generation & 0xffff, handles, [(expressions, userdata)] if ``exprs``) of one chain's
        rules, in order."""
        msg, _ = self._msg((_SUBSYS << 8) | _GETRULE, _F_REQUEST | _F_DUMP,
                           _attr(_TABLE, _str(table)) + _attr(_CHAIN, _str(chain)))
        self.sock.send(msg)
        handles: list[int] = []
        bodies: list[tuple[bytes, bytes]] = []
        gen = -1
        for kind, flags, _, data, off, ln in self._answers():
            if kind == _NLMSG_DONE:
                break
            if kind == _NLMSG_ERROR:
                err = _errno(data, off)
                raise OSError(err, f"nf_tables dump {table}/{chain}: {os.strerror(err)}")
            if flags & _F_DUMP_INTR:
                raise OSError(0, "nf_tables dump interrupted by a commit")
            gen = struct.unpack_from(">H", data, off + 18)[0]
            a = attrs(data, off + 20, off + ln)
            h = a.get(_HANDLE)
            handles.append(_BE64.unpack(h)[0] if h is not None and len(h) == 8 else -1)
            if exprs:
                bodies.append((bytes(a.get(_EXPRS, b"")), bytes(a.get(_USERDATA, b""))))
        return gen, handles, bodies

    def batch(self, msgs: list[tuple[int, int, bytes]]) -> dict[int, int]:
        """One transaction; {index of a NEWRULE in ``msgs``: its handle}. Raises on any error
        (the kernel then applied none of it)."""
        res = socket.htons(_SUBSYS)
        begin, _ = self._msg(_BATCH_BEGIN, _F_REQUEST, b"", 0, res)
        built = [self._msg(k, f | _F_ACK, p) for k, f, p in msgs]
        end, _ = self._msg(_BATCH_END, _F_REQUEST, b"", 0, res)
        self.sock.send(begin + b"".join(m for m, _ in built) + end)
        index = {seq: i for i, (_, seq) in enumerate(built)}
        pending, handles, errors = set(index), {}, []
        answers = self._answers()
        while pending:
            kind, _, seq, data, off, ln = next(answers)
            if kind == _NLMSG_ERROR:
                err = _errno(data, off)
                if err and seq not in index:  # the batch itself was refused: no more answers come
                    raise OSError(err, f"nf_tables batch: {os.strerror(err)}")
                pending.discard(seq)
                if err:
                    errors.append(f"#{index.get(seq)}: {os.strerror(err)}")
            elif kind == (_SUBSYS << 8) | _NEWRULE and seq in index:
                h = attrs(data, off + 20, off + ln).get(_HANDLE)
                if h is not None and len(h) == 8:
                    handles[index[seq]] = _BE64.unpack(h)[0]
        if errors:
            raise OSError(0, "nf_tables transaction refused: " + ", ".join(errors[:5]))
        return handles


@dataclass(frozen=True)
class NftEdit:
    """One owned chain's edit: rules at ``gone`` (0-based, in the current chain) deleted and
    ``new`` (0-based position in the resulting chain, rule) inserted."""

    table: str
    chain: str
    gone: tuple[int, ...]
    new: tuple[tuple[int, Rule], ...]


class NftEditor:
    """Rule-handle edits for the nft backend (see the module doc). Blocking parts run in threads."""

    def __init__(self, restore_cmd: str = "iptables-nft-restore") -> None:
        self.restore_cmd = restore_cmd
        self._scratch: int | None = None  # fd of the scratch network namespace
        self._scratch_sock: _Socket | None = None
        self._lock = threading.Lock()
        self.broken = ""  # why edits cannot work here (no scratch namespace, no nsenter): use restore

    def close(self) -> None:
        if self._scratch_sock is not None:
            self._scratch_sock.close()
            self._scratch_sock = None
        if self._scratch is not None:
            os.close(self._scratch)
            self._scratch = None

    # ------------------------------------------------------------------ handles
    def _handles(self, chains: Sequence[tuple[str, str]]) -> tuple[set[int], dict[tuple[str, str], list[int]]]:
        s = _Socket()
        try:
            gens: set[int] = set()
            out: dict[tuple[str, str], list[int]] = {}
            for t, c in chains:
                gen, out[(t, c)], _ = s.dump(t, c, exprs=False)
                if gen >= 0:
                    gens.add(gen)
            return gens, out
        finally:
            s.close()

    async def handles(self, chains: Sequence[tuple[str, str]]) -> tuple[set[int], dict[tuple[str, str], list[int]]]:
        """The handles of each chain's rules in order, and the generations (low 16 bits) seen."""
        try:
            return await asyncio.to_thread(self._handles, chains)
        except OSError as e:
            raise TransportError(f"nf_tables rule handles: {e}") from e

    # ------------------------------------------------------------------ scratch namespace
    def _make_scratch(self) -> None:
        box: dict[str, object] = {}

        def enter() -> None:  # a thread of its own: unshare moves only the calling thread
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.unshare(0x40000000) != 0:  # CLONE_NEWNET
                    raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
                box["fd"] = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
                box["sock"] = _Socket()
            except OSError as e:
                box["error"] = e

        th = threading.Thread(target=enter, name="nft-scratch-ns")
        th.start()
        th.join()
        if "error" in box:
            raise box["error"]  # type: ignore[misc]
        self._scratch = box["fd"]  # type: ignore[assignment]
        self._scratch_sock = box["sock"]  # type: ignore[assignment]

    def _compile(self, rules: Sequence[tuple[str, str, Rule]]) -> list[tuple[bytes, bytes]]:
        with self._lock:
            if self._scratch is None:
                try:
                    self._make_scratch()
                except OSError as e:
                    self.broken = f"no scratch network namespace: {e}"
                    raise
            assert self._scratch is not None and self._scratch_sock is not None
            by_table: dict[str, dict[str, list[Rule]]] = {}
            for t, c, r in rules:
                by_table.setdefault(t, {}).setdefault(c, []).append(r)
            lines: list[str] = []
            for t, chains in by_table.items():
                lines.append(f"*{t}")
                lines += [f":{c} - [0:0]" for c in chains]
                lines += [f"-F {c}" for c in chains]
                lines += [render(c, r) for c, rs in chains.items() for r in rs]
                lines.append("COMMIT")
            fd = self._scratch
            try:
                p = subprocess.run(["nsenter", f"--net=/proc/self/fd/{fd}", self.restore_cmd, "--noflush"],
                                   input=("\n".join(lines) + "\n").encode(), capture_output=True, pass_fds=(fd,),
                                   timeout=30)
            except FileNotFoundError as e:
                self.broken = str(e)
                raise
            if p.returncode != 0:
                raise OSError(0, f"scratch {self.restore_cmd} exited {p.returncode}: "
                              f"{p.stderr.decode(errors='replace').strip()}")
            got: dict[tuple[str, str], list[tuple[bytes, bytes]]] = {}
            for t, chains in by_table.items():
                for c, rs in chains.items():
                    _, _, dumped = self._scratch_sock.dump(t, c, exprs=True)
                    if len(dumped) != len(rs):
                        raise OSError(0, f"scratch {t}/{c}: {len(dumped)} rules compiled, {len(rs)} sent")
                    got[(t, c)] = dumped
            cursor = {k: 0 for k in got}
            out = []
            for t, c, _ in rules:
                i = cursor[(t, c)]
                cursor[(t, c)] = i + 1
                out.append(got[(t, c)][i])
            return out

    # ------------------------------------------------------------------ the transaction
    def _apply(self, edits: Sequence[NftEdit], handles: dict[tuple[str, str], list[int]],
               have: dict[tuple[str, str], Sequence[Rule]], want: dict[tuple[str, str], Sequence[Rule]]
               ) -> dict[tuple[str, str], list[int]]:
        todo = [(e.table, e.chain, r) for e in edits for _, r in e.new]
        compiled = self._compile(todo) if todo else []
        msgs: list[tuple[int, int, bytes]] = []
        placed: list[tuple[tuple[str, str], int, int]] = []  # (chain, position, index in msgs)
        k = 0
        for e in edits:
            key = (e.table, e.chain)
            hs, old, new_rules = handles[key], have[key], want[key]
            head = _attr(_TABLE, _str(e.table)) + _attr(_CHAIN, _str(e.chain))
            for i in e.gone:
                msgs.append(((_SUBSYS << 8) | _DELRULE, _F_REQUEST, head + _attr(_HANDLE, _BE64.pack(hs[i]))))
            news = {j for j, _ in e.new}
            for j, r in e.new:
                succ = next((n for n in range(j + 1, len(new_rules)) if n not in news), None)
                ex, ud = compiled[k]
                k += 1
                payload = head
                flags = _F_REQUEST | _F_CREATE | _F_ECHO
                if succ is None:
                    flags |= _F_APPEND  # after everything: the chain's end
                else:
                    payload += _attr(_POSITION, _BE64.pack(hs[old.index(new_rules[succ])]))  # just before it
                payload += _attr(_EXPRS | _NESTED, ex) + _attr(_COMPAT | _NESTED, _compat(r))
                if ud:
                    payload += _attr(_USERDATA, ud)
                placed.append((key, j, len(msgs)))
                msgs.append(((_SUBSYS << 8) | _NEWRULE, flags, payload))
        s = _Socket()
        try:
            got = s.batch(msgs)
        finally:
            s.close()
        out: dict[tuple[str, str], list[int]] = {}
        for e in edits:
            key = (e.table, e.chain)
            kept = list(handles[key])
            for i in reversed(e.gone):  # increasing indexes: from the end, each index still holds
                del kept[i]
            out[key] = kept
        for key, j, m in placed:  # in increasing position per chain: each position is final when used
            if m not in got:
                raise OSError(0, "nf_tables transaction: a new rule's handle was not echoed")
            out[key].insert(j, got[m])
        return out

    async def apply(self, edits: Sequence[NftEdit], handles: dict[tuple[str, str], list[int]],
                    have: dict[tuple[str, str], Sequence[Rule]], want: dict[tuple[str, str], Sequence[Rule]]
                    ) -> dict[tuple[str, str], list[int]]:
        """One transaction making each edited chain ``want``; the edited chains' new handles.
        Raises TransportError when it was refused (nothing applied) or could not be prepared."""
        try:
            return await asyncio.to_thread(self._apply, edits, handles, have, want)
        except (OSError, subprocess.SubprocessError, ValueError, KeyError, IndexError) as e:
            raise TransportError(f"nf_tables handle edit: {e}") from e
