"""ipMasq (iptables; only when asked): the container's nat chain, named as upstream names it."""

from __future__ import annotations

from ._proto import E_INVALID_CONFIG, E_PLUGIN, CniError


def masq_chain(name: str, container_id: str) -> str:
    try:  # the C hash itself: hashlib would load OpenSSL first (~3 ms per call)
        from _sha2 import sha512  # type: ignore[import-not-found]  # Python >= 3.12
    except ImportError:
        try:
            from _sha512 import sha512  # type: ignore[import-not-found,no-redef]
        except ImportError:
            from hashlib import sha512  # type: ignore[no-redef]
    return "CNI-" + sha512((name + container_id).encode()).hexdigest()[:24]


def masq_comment(name: str, container_id: str) -> str:
    return f'name: "{name}" id: "{container_id}"'


def _ipt_quote(s: str) -> str:
    """A word in iptables-restore's input: double-quoted, with backslash escapes."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _ipt_restore(lines: list[str], what: str) -> None:
    from . import _exec

    payload = "*nat\n" + "".join(line + "\n" for line in lines) + "COMMIT\n"
    rc, out, err = _exec.run(["iptables-restore", "-w", "--noflush"], payload.encode())
    if rc != 0:
        raise CniError(E_PLUGIN, f"failed to {what} IP masquerade", (err or out).decode(errors="replace").strip())


def setup_masq(name: str, container_id: str, subnets: list[str]) -> None:
    """The container's chain (its rules replaced: the chain is its own) and one POSTROUTING jump per
    subnet, in one iptables-restore transaction. One ``iptables -C`` first per subnet, so a
    repeated ADD (tolerated for <= 0.2.0) does not add a second jump. Two executions in all,
    where one per rule (seven) took most of an ADD's time when many ran at once."""
    from . import _exec

    chain, comment = masq_chain(name, container_id), masq_comment(name, container_id)
    if any(ch in comment for ch in "\n\r\0"):
        raise CniError(E_INVALID_CONFIG, "invalid network name or container ID for ipMasq")
    cm = "-m comment --comment " + _ipt_quote(comment)
    lines = [f":{chain} - [0:0]"]
    lines += [f"-A {chain} -d {s} -j ACCEPT {cm}" for s in subnets]
    lines.append(f"-A {chain} ! -d 224.0.0.0/4 -j MASQUERADE {cm}")
    for s in subnets:
        rc, _, _ = _exec.run(["iptables", "-w", "-t", "nat", "-C", "POSTROUTING", "-s", s, "-j", chain,
                              "-m", "comment", "--comment", comment])
        if rc != 0:  # no such rule (or no such chain yet)
            lines.append(f"-A POSTROUTING -s {s} -j {chain} {cm}")
    _ipt_restore(lines, "set up")


def teardown_masq(name: str, container_id: str) -> None:
    """Every POSTROUTING jump to the container's chain, then the chain: one ``iptables-save`` to
    find them (a DEL without prevResult and namespace does not know the subnets), one restore to
    remove them; nothing when neither is there (DEL is idempotent)."""
    from . import _exec

    chain = masq_chain(name, container_id)
    rc, out, _ = _exec.run(["iptables-save", "-t", "nat"])
    if rc != 0:
        return  # no nat table to read (or no iptables): nothing of ours can be there
    lines = out.decode(errors="replace").splitlines()
    exists = any(line.startswith(f":{chain} ") for line in lines)
    jumps = ["-D" + line[2:] for line in lines if line.startswith("-A POSTROUTING ")
             and (line.endswith(f" -j {chain}") or f" -j {chain} " in line)]
    if not exists and not jumps:
        return
    _ipt_restore(([f":{chain} - [0:0]"] if exists else []) + jumps + ([f"-X {chain}"] if exists else []),
                 "tear down")
