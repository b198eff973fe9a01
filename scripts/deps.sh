#!/usr/bin/env bash
# Installs the system packages rstargz's tests, demo and benchmarks use.
# Idempotent: skips apt entirely when everything is already installed.
set -euo pipefail
PKGS=(containerd runc docker-registry stargz-snapshotter skopeo fuse3 debootstrap
      iproute2 golang-go golang-github-containerd-stargz-snapshotter-dev
      protobuf-compiler jq pigz e2fsprogs util-linux curl tar mount
      # The start-up benchmark: tc (iproute2) and its chart.
      gnuplot-nox fonts-dejavu-core)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# Debian's packages start no services here (no systemd), and we never use
# their default paths or ports: every test runs its own instances.
