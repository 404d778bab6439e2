#!/usr/bin/env bash
# Builds Corral's image with podman from a Debian 12 base made here, no registry involved:
#   1. debootstrap a minimal bookworm root file system from the Debian mirror this machine's apt
#      already uses (or $MIRROR), and `podman import` it as localhost/corral-base:bookworm;
#   2. Corral and its dependencies as wheels, with this machine's pip (its index and certificates),
#      in a build context of their own beside the CNI plugins, so the image build needs no index;
#   3. `podman build` containers/Containerfile on it -> localhost/corral:latest (or $TAG).
# The base is made once and reused; CORRAL_REBUILD_BASE=1 makes it again. Run as root from anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=${BASE:-localhost/corral-base:bookworm}
TAG=${TAG:-localhost/corral:latest}
SUITE=${SUITE:-bookworm}

mirror() {
  if [ -n "${MIRROR:-}" ]; then echo "$MIRROR"; return; fi
  # the first Debian main archive in apt's own sources (deb822 or one-line format)
  local m
  m=$(grep -hoE '^(URIs:|deb) +[a-z]+://[^ ]+/debian/?( |$)' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list \
        2>/dev/null | head -1 | awk '{print $2}') || true
  if [ -z "$m" ]; then echo "containers/build.sh: no Debian mirror in apt's sources; set MIRROR" >&2; exit 2; fi
  echo "$m"
}

command -v podman >/dev/null || { echo "containers/build.sh: podman is not installed" >&2; exit 2; }
t0=$(date +%s)
# A base named localhost/... is made here; any other name (a registry's debian:12) is podman's to pull.
if [[ "$BASE" == localhost/* ]] && { [ "${CORRAL_REBUILD_BASE:-0}" = 1 ] || ! podman image exists "$BASE"; }; then
  command -v debootstrap >/dev/null || { echo "containers/build.sh: debootstrap is not installed" >&2; exit 2; }
  root=$(mktemp -d /tmp/corral-rootfs.XXXXXX)
  trap 'rm -rf "$root"' EXIT  # replaced below by one that removes the build context too
  echo "base: debootstrap $SUITE into $root"
  debootstrap --variant=minbase "$SUITE" "$root" "$(mirror)" >"$root.log" 2>&1 \
    || { tail -20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
  rm -f "$root.log"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
  echo "base: $BASE ($(( $(date +%s) - t0 )) s)"
fi
t1=$(date +%s)
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
ctx=$(mktemp -d /tmp/corral-context.XXXXXX)
trap 'rm -rf "$ctx" ${root:+"$root"}' EXIT
"$PY" -m pip wheel -q --wheel-dir "$ctx/wheels" . >/dev/null
cp -a cni-plugins "$ctx/cni-plugins"
find "$ctx/cni-plugins" -name __pycache__ -prune -exec rm -rf {} +
echo "wheels: $(ls "$ctx/wheels" | wc -l) files ($(( $(date +%s) - t1 )) s)"
podman build --network host --build-arg BASE="$BASE" -f containers/Containerfile -t "$TAG" "$ctx"
echo "image: $TAG ($(( $(date +%s) - t1 )) s; total $(( $(date +%s) - t0 )) s)"
