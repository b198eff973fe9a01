#!/bin/sh
# Builds the Go reference stargz snapshotter (containerd-stargz-grpc) from
# Debian packages only, for benchmarks that compare rstargz with it, and
# prints the binary's path.
#
# Debian ships the library (golang-github-containerd-stargz-snapshotter-dev)
# and ctr-remote, but not containerd-stargz-grpc: its `service` packages need
# k8s.io/cri-api, which bookworm lacks. scripts/reference-snapshotter/main.go
# is a small entry point of ours over the library's fs, fs/source and
# snapshot packages; it is built in GOPATH mode against /usr/share/gocode with
# the module proxy off, so nothing but apt is contacted.
#
# Idempotent: apt runs only when a package is missing, and the binary is
# rebuilt only when main.go or the library's version changed.
#
#   scripts/reference-snapshotter.sh            # prints the path
#   RSTARGZ_REF_CACHE=/some/dir scripts/reference-snapshotter.sh
set -eu

here=$(cd "$(dirname "$0")" && pwd)
src="$here/reference-snapshotter"
cache=${RSTARGZ_REF_CACHE:-/var/cache/rstargz-ref}
bin="$cache/containerd-stargz-grpc"
packages="golang-go golang-github-containerd-stargz-snapshotter-dev"

missing=""
for p in $packages; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update >&2
    # shellcheck disable=SC2086
    apt-get install -y --no-install-recommends $missing >&2
fi

# What the binary was built from: our source plus the library's version.
stamp="$(sha256sum "$src/main.go" | cut -d' ' -f1) $(dpkg-query -W -f='${Version}' golang-github-containerd-stargz-snapshotter-dev)"
if [ -x "$bin" ] && [ -f "$bin.stamp" ] && [ "$(cat "$bin.stamp")" = "$stamp" ]; then
    echo "$bin"
    exit 0
fi

mkdir -p "$cache"
work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
(
    cd "$src"
    GO111MODULE=off GOPROXY=off GOFLAGS= GOPATH="$work/gopath:/usr/share/gocode" \
        GOCACHE="$cache/gocache" CGO_ENABLED=0 \
        go build -trimpath -o "$work/containerd-stargz-grpc" .
) >&2
mv "$work/containerd-stargz-grpc" "$bin"
echo "$stamp" >"$bin.stamp"
echo "$bin"
