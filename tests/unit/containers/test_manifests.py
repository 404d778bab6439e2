"""containers/: the compose file against the compose spec's schema, the Kubernetes manifests against
the Kubernetes schemas (both offline, from packages in the dev extras), every command line they
give a daemon against that daemon's own parser, the Prometheus config and rules with promtool, and
every metric the Grafana dashboard and the alert rules use against the metrics the code defines."""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shlex
import subprocess
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from agents.cli import SUBCOMMANDS
from tests.helpers.tools import require_tool

ROOT = Path(__file__).resolve().parents[3]
CONTAINERS = ROOT / "containers"
K8S_VERSION = "1.30.0"


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((CONTAINERS / "docker-compose.yml").read_text())
    return doc


def k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted((CONTAINERS / "k8s").glob("*.yaml")):
        out += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def parser_of(command: str) -> argparse.ArgumentParser:
    mod = importlib.import_module(SUBCOMMANDS[command][0])
    fn = getattr(mod, "build_parser", None) or getattr(mod, "_parser", None)
    assert fn is not None, f"corral {command} has no parser to check against"
    p: argparse.ArgumentParser = fn()
    return p


def corral_argv(argv: list[str]) -> list[str]:
    """The `corral ...` arguments of a container: its args, or what a `sh -c` script execs."""
    if argv[:1] == ["sh"] or (argv and argv[0] == "-c"):
        script = argv[-1]
        m = re.search(r"exec corral (.*)$", script, re.S)
        assert m, f"a shell entrypoint must end by exec'ing corral: {script!r}"
        return shlex.split(m.group(1))
    return argv


def check_command(argv: list[str], where: str) -> str:
    """``argv`` names a corral command and every flag parses with that command's parser."""
    assert argv and argv[0] in SUBCOMMANDS, f"{where}: {argv[:1]} is not a corral command"
    p = parser_of(argv[0])
    try:
        p.parse_args(argv[1:])
    except SystemExit as e:
        raise AssertionError(f"{where}: corral {' '.join(argv)} is refused by its parser") from e
    return argv[0]


# ------------------------------------------------------------------ compose


def compose_validator() -> Any:
    """The compose spec's JSON schema as check-jsonschema ships it, with the validator of its draft."""
    schema = json.loads(resources.files("check_jsonschema.builtin_schemas.vendor")
                        .joinpath("compose-spec.json").read_text())
    return jsonschema.validators.validator_for(schema)(schema)


def test_compose_file_matches_the_compose_spec() -> None:
    errors = sorted(compose_validator().iter_errors(compose()), key=str)
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_the_schema_check_can_fail() -> None:
    bad = compose()
    bad["services"]["dns"]["network_mode"] = ["service:metadata"]  # a list where a string goes
    bad["services"]["metadata"]["no_such_key"] = 1
    assert len(list(compose_validator().iter_errors(bad))) >= 2


def test_compose_services_are_real_commands_in_the_originals_network_modes() -> None:
    services = compose()["services"]
    commands = {}
    for name, svc in services.items():
        argv = [*svc.get("entrypoint", []), *svc["command"]]
        commands[name] = check_command(corral_argv(argv), f"compose service {name}")
    assert commands == {"metadata": "metadata", "dns": "dns", "healthcheck": "healthcheck",
                        "network-manager": "netmanager", "overlay": "overlay",
                        "etc-host-updater": "etc-host-updater", "scheduler": "scheduler"}
    md = services["metadata"]
    assert "169.254.169.250/32" in md["command"][0] and "NET_ADMIN" in md["cap_add"]
    assert services["dns"]["network_mode"] == services["healthcheck"]["network_mode"] == "service:metadata"
    nm = services["network-manager"]
    assert nm["network_mode"] == "host" and nm["privileged"] is True
    assert {"rancher-cni-driver:/etc/cni", "rancher-cni-driver:/opt/cni"} <= set(nm["volumes"])
    assert "rancher-cni-driver" in compose()["volumes"]
    assert services["scheduler"]["profiles"] == ["server"]  # once per environment, not per node


# ------------------------------------------------------------------ kubernetes


def test_kubernetes_manifests_match_the_schemas() -> None:
    docs = k8s_docs()
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for _, d in docs)
    assert kinds == ["ConfigMap/corral-cni", "DaemonSet/corral-metadata", "DaemonSet/corral-netmanager",
                     "DaemonSet/corral-overlay", "Namespace/corral-system", "Role/corral-node",
                     "RoleBinding/corral-node", "Secret/corral-cattle", "ServiceAccount/corral-node"]
    for name, d in docs:
        try:
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(f"{name}: {d['kind']}/{d['metadata']['name']}: {e}") from None


def test_the_kubernetes_check_can_fail() -> None:
    ds = next(d for _, d in k8s_docs() if d["kind"] == "DaemonSet")
    ds["spec"]["template"]["spec"]["containers"][0]["ports"] = [{"containerPort": "not a number"}]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, K8S_VERSION, strict=True)


def test_daemonsets_run_real_commands_and_kubelet_gets_a_cni_config() -> None:
    docs = dict((f"{d['kind']}/{d['metadata']['name']}", d) for _, d in k8s_docs())
    seen = set()
    for key, d in docs.items():
        if d["kind"] != "DaemonSet":
            continue
        spec = d["spec"]["template"]["spec"]
        assert spec["serviceAccountName"] == "corral-node"
        for c in spec["containers"]:
            argv = [*c.get("command", []), *c.get("args", [])]
            seen.add(check_command(corral_argv(argv), f"{key} container {c['name']}"))
    assert seen == {"metadata", "dns", "healthcheck", "netmanager", "overlay"}
    nm = docs["DaemonSet/corral-netmanager"]["spec"]["template"]["spec"]
    assert nm["hostNetwork"] is True and nm["containers"][0]["securityContext"]["privileged"] is True
    paths = {v["hostPath"]["path"] for v in nm["volumes"] if "hostPath" in v}
    assert {"/etc/cni/net.d", "/opt/cni/bin"} <= paths
    conf = json.loads(docs["ConfigMap/corral-cni"]["data"]["10-corral.conf"])
    assert conf["type"] == "corral-bridge" and conf["ipam"]["type"] == "corral-ipam" and conf["cniVersion"]
    bundle = {p.name for p in (ROOT / "cni-plugins").iterdir()}
    assert {"corral-bridge", "corral-ipam"} <= bundle  # the plugins the conf names are the ones we ship


# ------------------------------------------------------------------ prometheus and grafana


def test_promtool_accepts_the_scrape_config_and_the_rules(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    prom = CONTAINERS / "prometheus"
    for args in (["check", "config", str(prom / "prometheus.yml")], ["check", "rules", str(prom / "corral-rules.yml")]):
        r = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
    bad = tmp_path / "bad-rules.yml"
    bad.write_text("groups:\n  - name: x\n    rules:\n      - alert: Broken\n        expr: up{ ==\n")
    r = subprocess.run([promtool, "check", "rules", str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0


_DEF = re.compile(r'\b(counter|gauge|histogram)\(\s*"(\w+)",\s*"(\w+)"')
_WATCH = re.compile(r'MetadataWatch\([^)]*component="(\w+)"', re.S)
_SERIES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def exported_metrics() -> set[str]:
    """Every series name the daemons' code defines (the metrics helpers' calls, and the staleness
    gauge each MetadataWatch exports under its component's name)."""
    names: set[str] = set()
    for pkg in ("agents", "metadata", "dns", "healthcheck", "netmanager", "scheduler", "etchosts"):
        for path in (ROOT / pkg).rglob("*.py"):
            text = path.read_text()
            for kind, sub, name in _DEF.findall(text):
                names |= {f"corral_{sub}_{name}{s}" for s in _SERIES[kind]}
            names |= {f"corral_{c}_metadata_age_seconds" for c in _WATCH.findall(text)}
    return names


def used_metrics(exprs: list[str]) -> set[str]:
    return {m for e in exprs for m in re.findall(r"\bcorral_\w+", e)}


def test_dashboard_and_rules_use_only_metrics_the_daemons_export() -> None:
    exported = exported_metrics()
    assert {"corral_dns_queries_total", "corral_dns_metadata_age_seconds",
            "corral_metadata_apply_seconds_bucket"} <= exported  # the scan finds what it must
    dash = json.loads((CONTAINERS / "grafana" / "corral-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    rules = yaml.safe_load((CONTAINERS / "prometheus" / "corral-rules.yml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = used_metrics(exprs)
    assert len(used) >= 15
    assert used - exported == set(), f"not exported by any daemon: {sorted(used - exported)}"
    assert used_metrics(["rate(corral_dns_no_such_metric_total[5m])"]) - exported  # the check can fail
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"] == "corral-node"


def test_containerfile_installs_what_the_daemons_drive() -> None:
    text = (CONTAINERS / "Containerfile").read_text()
    for pkg in ("haproxy", "iptables", "iproute2", "conntrack", "ipset", "strongswan-charon", "strongswan-swanctl"):
        assert re.search(rf"\s{re.escape(pkg)}\s", text), pkg
    assert 'ENTRYPOINT ["corral"]' in text
