"""The package step (rancher-cni-driver layout) and the plugin path's import budget."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from corral_cni._record import record

PKG = Path(__file__).resolve().parents[3] / "cni-plugins" / "package.py"


def load_package():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("corral_cni_package", PKG)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bundle_layout(tmp_path: Path) -> None:
    mod = load_package()
    bindir = mod.build(tmp_path / "vol", "/usr/bin/python3", network="ipsec")
    vol = tmp_path / "vol"
    assert sorted(os.listdir(bindir)) == [".interpreter", "corral-bridge", "corral-ipam", "rancher-bridge", "rancher-cni-ipam"]
    assert os.readlink(bindir / "rancher-bridge") == "corral-bridge"
    assert os.readlink(bindir / "rancher-cni-ipam") == "corral-ipam"
    launcher = (bindir / "corral-bridge").read_text()
    assert launcher.startswith(f"#!{vol / 'lib' / 'python' / 'python3'}\n") and str(vol / "lib") in launcher
    assert os.readlink(vol / "lib" / "python" / "python3") == "/usr/bin/python3"
    assert os.access(bindir / "corral-bridge", os.X_OK)
    conf = vol / "ipsec.d" / "10-rancher.conf"
    assert json.loads(conf.read_text())["type"] == "rancher-bridge"
    assert conf.read_text().startswith('{\n  "name"')  # 2-space JSON as the config writer does
    assert oct(conf.stat().st_mode & 0o777) == "0o600" and oct((vol / "ipsec.d").stat().st_mode & 0o777) == "0o700"
    assert os.readlink(vol / "managed.d") == "ipsec.d"
    assert any(p.suffix == ".pyc" for p in (vol / "lib" / "corral_cni").rglob("*.pyc"))
    # re-running switches the managed link atomically and keeps the bundle working
    mod.build(vol, "/usr/bin/python3", network="vxlan")
    assert os.readlink(vol / "managed.d") == "vxlan.d" and (vol / "ipsec.d").exists()


def test_launcher_runs_version_and_imports_nothing_heavy(tmp_path: Path) -> None:
    bindir = load_package().build(tmp_path / "vol", sys.executable, network=None)
    p = subprocess.run([str(bindir / "corral-ipam")], input=b'{"cniVersion":"0.4.0"}', capture_output=True,
                       env={"CNI_COMMAND": "VERSION"}, check=True)
    assert json.loads(p.stdout)["cniVersion"] == "0.4.0"
    # the modules a real ADD path loads: no asyncio, pyroute2, dataclasses/inspect, typing, subprocess, json/re,
    # not even os (posix and a few helpers do: _os.py) or hashlib (OpenSSL)
    lib = str(tmp_path / "vol" / "lib")
    code = (f"import sys; sys.path.insert(0, {lib!r}); import corral_cni._main, corral_cni._bridge, corral_cni._add, "
            "corral_cni._check, corral_cni._masq, "
            "corral_cni._ipam, corral_cni._metadata, corral_cni._netlink, corral_cni._docker, corral_cni._exec; "
            "print(' '.join(sorted(sys.modules)))")
    mods = set(subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True,
                              check=True).stdout.split())
    for heavy in ("asyncio", "pyroute2", "dataclasses", "inspect", "typing", "subprocess", "urllib", "http",
                  "agents", "json", "re", "ctypes", "enum", "os", "hashlib", "_hashlib", "locale", "threading",
                  # modules of their own for a codec (a BOM is skipped by hand) and for a re-export
                  "encodings.utf_8_sig", "struct", "_ctypes"):
        assert heavy not in mods, heavy


def test_launcher_runs_the_core_file_and_falls_back_to_the_package(tmp_path: Path) -> None:
    import importlib.util

    bindir = load_package().build(tmp_path / "vol", sys.executable, network=None)
    lib = tmp_path / "vol" / "lib"
    core = lib / "corral_cni.core"
    assert core.read_bytes()[:4] == importlib.util.MAGIC_NUMBER

    def version() -> str:
        p = subprocess.run([str(bindir / "corral-bridge")], input=b'{"cniVersion":"1.0.0"}', capture_output=True,
                           env={"CNI_COMMAND": "VERSION"}, check=False)
        assert p.returncode == 0 and not p.stderr, p.stderr
        return str(json.loads(p.stdout)["cniVersion"])

    # the core alone serves the modules it holds: their sources and .pyc files are not read
    hidden = [f for f in (lib / "corral_cni").rglob("_main*") if f.is_file()]
    for f in hidden:
        f.rename(f.with_name(f.name + ".hidden"))
    assert version() == "1.0.0"
    for f in hidden:
        f.with_name(f.name + ".hidden").rename(f)
    # another interpreter's core (other magic number), or none: the package is imported as usual
    core.write_bytes(b"\0\0\r\n" + core.read_bytes()[4:])
    assert version() == "1.0.0"
    core.unlink()
    assert version() == "1.0.0"


def test_record_stand_in() -> None:
    @record(frozen=True)
    class P:
        a: int
        b: str = "x"

    assert P(1) == P(1, "x") == P(a=1) and P(1) != P(2)
    assert repr(P(1, b="y")) == "P(a=1, b='y')"
    for bad in ((), (1, "x", 3)):
        try:
            P(*bad)
        except TypeError:
            continue
        raise AssertionError(bad)


def test_auto_interpreter_is_a_working_python(tmp_path: Path) -> None:
    mod = load_package()
    chosen = mod.choose_python([sys.executable, "/nonexistent/python3", str(tmp_path)])
    assert chosen == sys.executable
    bindir = mod.build(tmp_path / "vol", "auto", network=None)
    py = (bindir / ".interpreter").read_text().strip()
    assert os.readlink(tmp_path / "vol" / "lib" / "python" / "python3") == py
    assert (bindir / "corral-bridge").read_text().startswith(f"#!{tmp_path / 'vol' / 'lib' / 'python' / 'python3'}\n")


def test_start_up_interpreter_is_isolated_and_keeps_every_codec(tmp_path: Path) -> None:
    bindir = load_package().build(tmp_path / "vol", sys.executable, network=None)
    exe = tmp_path / "vol" / "lib" / "python" / "python3"
    assert (bindir / "corral-ipam").read_text().startswith(f"#!{exe}\n")
    code = ("import sys, codecs, encodings; print(sys.flags.isolated, sys.flags.no_site, 'site' in sys.modules, "
            "encodings.__file__, sys.stdout.encoding, codecs.lookup('latin1').name, codecs.lookup('cp1252').name, "
            "'\u00e9'.encode('windows-1252'), b'\\xe9'.decode('iso-8859-15'), encodings.normalize_encoding('a b'), "
            "sys.path)")
    # PYTHON* variables are ignored as with -I; -S: no site
    p = subprocess.run([str(exe), "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONPATH": "/nonexistent", "PYTHONSTARTUP": "/nonexistent", "LANG": "C"})
    out = p.stdout.split(" ", 6)
    assert out[:3] == ["1", "1", "False"], p.stdout
    assert out[3].startswith(str(exe.parent / "encodings")), p.stdout
    assert out[4:6] == ["utf-8", "iso8859-1"] and "cp1252 b'\\xe9' \u00e9 a_b" in p.stdout, p.stdout
    assert "/nonexistent" not in p.stdout and str(tmp_path / "vol" / "lib") in p.stdout
    # a bundle copied onto a host whose Python is another one: that Python's own standard library
    other = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3")
                  if os.path.exists(p) and os.path.realpath(p) != os.path.realpath(sys.executable)), None)
    if other is not None:
        exe.unlink()
        exe.symlink_to(other)
        v = subprocess.run([str(bindir / "corral-bridge")], input=b'{"cniVersion":"1.0.0"}', capture_output=True,
                           env={"CNI_COMMAND": "VERSION"}, check=True)
        assert json.loads(v.stdout)["cniVersion"] == "1.0.0"
        std = subprocess.run([other, "-IS", "-c", "import json; print(json.__file__)"], capture_output=True, text=True,
                             check=True).stdout.strip()
        here = subprocess.run([str(exe), "-c", "import json; print(json.__file__)"], capture_output=True, text=True,
                              check=True).stdout.strip()
        assert here == std
    # and the plugins still answer when that interpreter cannot be made: #!python -IS as before
    mod = load_package()
    mod.PATHS_QUERY = "raise SystemExit(3)"
    bindir = mod.build(tmp_path / "vol2", sys.executable, network=None)
    assert (bindir / "corral-bridge").read_text().startswith(f"#!{sys.executable} -IS\n")
    assert not (tmp_path / "vol2" / "lib" / "python").exists()
    v = subprocess.run([str(bindir / "corral-bridge")], input=b'{"cniVersion":"1.0.0"}', capture_output=True,
                       env={"CNI_COMMAND": "VERSION"}, check=True)
    assert json.loads(v.stdout)["cniVersion"] == "1.0.0"
