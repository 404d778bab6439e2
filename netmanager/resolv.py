"""A container's resolv.conf pointed at the metadata DNS, as a pure function of its text.

Every ``nameserver`` line without the metadata IP is commented out (``# ``), ``nameserver
<metadata IP>`` is added when absent, and the search list gets ``<svc>.<stack>.rancher.internal``,
``<stack>.rancher.internal`` (unless ``io.rancher.container.dns.priority=None``), the
container's own DNS search entries and ``rancher.internal``; domains already there are not
repeated; ours go first unless the priority is ``service_last``. Applying it twice changes
nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["render_resolv", "wants_resolv"]


def wants_resolv(labels: dict[str, str]) -> bool:
    if labels.get("io.rancher.container.dns") == "false":
        return False
    return ("io.rancher.cni.network" in labels or labels.get("io.rancher.container.dns") == "true"
            or labels.get("io.rancher.container.network") == "true")


def _ours(labels: dict[str, str], dns_search: Iterable[str]) -> list[str]:
    out: list[str] = []
    stack_svc = labels.get("io.rancher.stack_service.name", "")
    if labels.get("io.rancher.container.dns.priority") != "None" and "/" in stack_svc:
        stack, _, svc = stack_svc.lower().partition("/")
        out += [f"{svc}.{stack}.rancher.internal", f"{stack}.rancher.internal"]
    out += [d for d in dns_search if d]
    out.append("rancher.internal")
    seen: set[str] = set()
    return [d for d in out if not (d in seen or seen.add(d))]  # type: ignore[func-returns-value]


def render_resolv(text: str, *, metadata_ip: str, labels: dict[str, str],
                  dns_search: Iterable[str] = ()) -> str:
    ours = _ours(labels, dns_search)
    last = labels.get("io.rancher.container.dns.priority") == "service_last"
    lines: list[str] = []
    has_ns = has_search = False
    for line in text.splitlines():
        words = line.split()
        if words and words[0] == "nameserver":
            if metadata_ip in line:
                has_ns = True
            else:
                line = "# " + line
        elif words and words[0] == "search":
            present = words[1:]
            add = [d for d in ours if d not in present]
            line = "search " + " ".join(present + add if last else add + present)
            has_search = True
        lines.append(line)
    if not has_search:
        lines.append("search " + " ".join(ours))
    if not has_ns:
        lines.append(f"nameserver {metadata_ip}")
    return "\n".join(lines) + "\n"
