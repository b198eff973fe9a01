#!/usr/bin/env bash
# rstargz demo: run `python3 -c 'print("hello")'` from a Debian-based Python
# image, cold each time: pulled the ordinary way (overlayfs), lazily pulled
# as eStargz made by `rstargz convert` through rstargz-grpc (FUSE), and, when
# this build has `rstargz optimize`, lazily pulled as an optimized eStargz
# (prioritized files = what the workload read). Prints pull, create and run
# seconds and the bytes fetched from the registry for each.
#
#   sudo ./scripts/demo.sh
#
# Everything runs on private instances: a docker-registry on a free
# 127.0.0.1 port, rstargz-grpc and a containerd with their own sockets and
# directories under one work dir, removed on exit. Nothing touches a system
# containerd or default paths/ports. The Debian rootfs is cached under
# /var/cache/rstargz-demo/ (override with RSTARGZ_DEMO_CACHE); the mirror is
# the one apt is configured with (or RSTARGZ_DEBIAN_MIRROR).
# -E: the ERR trap (which prints the relevant log tail) also fires in functions.
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${RSTARGZ_DEMO_CACHE:-/var/cache/rstargz-demo}
SUITE=bookworm
ROOTFS_TAR=$CACHE/debian-$SUITE-minbase-python3-amd64.tar
NS=rstargz-demo
CMD=(python3 -c 'print("hello")')
WORK=""
BUILD_TMP=""      # an unfinished rootfs build under $CACHE, removed on failure
PIDS=()            # processes we started, stopped in reverse order
CURRENT_LOG=""     # log whose tail explains a failure in the current step
T0=$(date +%s.%N)

log() { printf '==> %s\n' "$*" >&2; }

die() {
  printf '\nDEMO FAILED: %s\n' "$*" >&2
  if [[ -n $CURRENT_LOG && -f $CURRENT_LOG ]]; then
    printf -- '--- tail of %s ---\n' "$CURRENT_LOG" >&2
    tail -n 40 "$CURRENT_LOG" >&2
  fi
  exit 1
}

# Any command failing under `set -e` lands here with its line number.
trap 'die "command failed (exit $?) at line $LINENO: $BASH_COMMAND"' ERR

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

# ---------------------------------------------------------------- cleanup --

cleanup() {
  local rc=$?
  trap - ERR
  set +e
  if [[ -n $BUILD_TMP && -d $BUILD_TMP ]]; then
    unmount_under "$BUILD_TMP"
    rm -rf --one-file-system "$BUILD_TMP"
  fi
  if [[ -n $WORK && -d $WORK ]]; then
    log "cleaning up $WORK"
    if [[ -S $WORK/containerd.sock ]]; then
      # Tasks first, so no container process outlives the demo.
      for t in $(ctrd tasks ls -q 2>/dev/null); do
        ctrd tasks kill -s SIGKILL "$t" >/dev/null 2>&1
        ctrd tasks delete -f "$t" >/dev/null 2>&1
      done
      for c in $(ctrd containers ls -q 2>/dev/null); do
        ctrd containers delete "$c" >/dev/null 2>&1
      done
    fi
    local i
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
      stop_pid "${PIDS[i]}"
    done
    # Shims of our containerd carry its socket path in their argv.
    local shim
    for shim in $(pgrep -f -- "-address $WORK/containerd.sock" 2>/dev/null); do
      kill -KILL "$shim" 2>/dev/null
    done
    # The daemon leaves its FUSE connection to its holder process for a
    # successor (docs/restart.md); there is none: end it.
    pkill -f -- "--fuse-holder $WORK/" 2>/dev/null
    unmount_under "$WORK"
    rm -rf --one-file-system "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# SIGTERM, then SIGKILL after 10 s.
stop_pid() {
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || return 0
  for i in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null; return 0; }
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
}

# Lazily unmounts everything mounted under $1, deepest first (FUSE layers,
# overlay rootfs, shm...): a dead FUSE daemon must not block `rm -rf`.
unmount_under() {
  local dir=$1 m
  awk -v d="$dir/" '{ m = $5; gsub(/\\040/, " ", m); if (index(m "/", d) == 1) print m }' \
    /proc/self/mountinfo | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done
}

# ---------------------------------------------------------------- helpers --

ctrd() { ctr --address "$WORK/containerd.sock" --namespace "$NS" "$@"; }
ctrd_remote() { ctr-remote --address "$WORK/containerd.sock" --namespace "$NS" "$@"; }

# Polls `$2...` until it succeeds; fails with $1's log tail after 30 s, or
# at once if the process with pid $PID_WAIT died.
wait_ready() {
  local what=$1 pid=$2 i
  shift 2
  for i in $(seq 300); do
    kill -0 "$pid" 2>/dev/null || die "$what exited during startup"
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  die "$what not ready after 30 s"
}

# A free TCP port on 127.0.0.1 from the ephemeral range, never 5000.
free_port() {
  local p i
  for i in $(seq 50); do
    p=$((20000 + RANDOM % 30000))
    ss -Htln "sport = :$p" | grep -q . || { echo "$p"; return 0; }
  done
  die "no free port found"
}

# Sum of bytes the registry sent for blob GETs in access-log lines after
# line $1 (combined log format: `... "GET /v2/<name>/blobs/<d> HTTP/1.1"
# 200 <bytes> ...`), as tests/support/registry.rs `blob_bytes_served` does.
blob_bytes_since() {
  tail -n +"$(($1 + 1))" "$WORK/registry.log" | awk '
    { i = index($0, "] \""); if (i == 0) next
      rest = substr($0, i + 3); j = index(rest, "\""); if (j == 0) next
      split(substr(rest, 1, j - 1), req, " ")
      split(substr(rest, j + 1), f, " ")
      if (req[1] == "GET" && req[2] ~ /\/blobs\// && f[2] ~ /^[0-9]+$/) s += f[2] }
    END { printf "%d\n", s }'
}
log_lines() { wc -l <"$WORK/registry.log"; }

# The apt source serving the main Debian archive for $SUITE, read at run
# time from apt's config (one-line and deb822 formats) — never hard-coded.
apt_mirror() {
  if [[ -n ${RSTARGZ_DEBIAN_MIRROR:-} ]]; then echo "$RSTARGZ_DEBIAN_MIRROR"; return; fi
  local files=() f
  [[ -f /etc/apt/sources.list ]] && files+=(/etc/apt/sources.list)
  for f in /etc/apt/sources.list.d/*.list; do [[ -f $f ]] && files+=("$f"); done
  local candidates
  candidates=$(
    { for f in "${files[@]}"; do
        sed 's/#.*//; s/\[[^]]*\]//' "$f" | awk -v s="$SUITE" '$1 == "deb" && $3 == s { print $2 }'
      done
      for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        awk -v s="$SUITE" '
          function flush() { if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " s " ") && enabled != "no") print uris
                             types = suites = uris = enabled = "" }
          /^#/ { next }
          /^[ \t]*$/ { flush(); next }
          { k = tolower($1); sub(/:$/, "", k); v = $0; sub(/^[^:]*:[ \t]*/, "", v)
            if (k == "types") types = v; else if (k == "suites") suites = v
            else if (k == "uris") uris = v; else if (k == "enabled") enabled = v }
          END { flush() }' "$f" | tr ' ' '\n'
      done
    } | grep -E '^https?://' || true)
  # Prefer the main archive (…/debian) over security or ports archives.
  f=$(grep -E '/debian/?$' <<<"$candidates" | head -n1 || true)
  [[ -n $f ]] || f=$(head -n1 <<<"$candidates")
  [[ -n $f ]] || die "no http(s) apt source for $SUITE in /etc/apt; set RSTARGZ_DEBIAN_MIRROR"
  echo "$f"
}

# ----------------------------------------------------------------- steps --

build() {
  log "installing dependencies (scripts/deps.sh)"
  "$REPO/scripts/deps.sh"
  log "building rstargz (cargo build --release --bins)"
  local cargo
  cargo=$(command -v cargo || echo "${HOME:-/root}/.cargo/bin/cargo")
  [[ -x $cargo ]] || die "cargo not found (install Rust with rustup first)"
  (cd "$REPO" && "$cargo" build --release --bins --quiet)
  BIN=${CARGO_TARGET_DIR:-$REPO/target}/release
  [[ -x $BIN/rstargz-grpc ]] || die "$BIN/rstargz-grpc was not built"
}

start_registry() {
  mkdir -p "$WORK/registry/storage"
  local try port
  CURRENT_LOG=$WORK/registry.log
  # The port may be taken between probe and bind: retry a few times.
  for try in 1 2 3; do
    port=$(free_port)
    # Everything a default would pick (port 5000, /var/lib, debug port) is
    # set explicitly; the access log is what we count bytes from.
    cat >"$WORK/registry/config.yml" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $WORK/registry/storage
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:$port
  secret: rstargz-demo-$port
health:
  storagedriver:
    enabled: false
EOF
    docker-registry serve "$WORK/registry/config.yml" >"$WORK/registry.log" 2>&1 &
    local pid=$!
    local i
    for i in $(seq 200); do
      kill -0 "$pid" 2>/dev/null || break
      if [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$port/v2/") == 200 ]]; then
        PIDS+=("$pid")
        REG=127.0.0.1:$port
        log "registry on $REG"
        return 0
      fi
      sleep 0.1
    done
    stop_pid "$pid"
  done
  die "docker-registry did not start"
}

start_daemon() {
  # Background fetch off: the bytes counted for the lazy run are then what
  # the pull and the container actually read, not what the daemon streams
  # in behind them.
  printf '[layer]\nbackground_fetch = false\n' >"$WORK/rstargz.toml"
  CURRENT_LOG=$WORK/rstargz.log
  rm -f "$WORK/rstargz.sock"
  "$BIN/rstargz-grpc" --address "$WORK/rstargz.sock" --root "$WORK/rstargz-root" \
    --config "$WORK/rstargz.toml" --log-level info >>"$WORK/rstargz.log" 2>&1 &
  DAEMON_PID=$!
  PIDS+=("$DAEMON_PID")
  wait_ready rstargz-grpc "$DAEMON_PID" test -S "$WORK/rstargz.sock"
  log "rstargz-grpc on $WORK/rstargz.sock"
}

# Restarts rstargz-grpc on an empty chunk cache (memory and disk), so each
# lazy run starts cold; waits until containerd reaches it again (a Prepare
# and Remove of a scratch snapshot: `snapshots ls` is answered by
# containerd's own metadata).
restart_daemon_cold() {
  CURRENT_LOG=$WORK/rstargz.log
  stop_pid "$DAEMON_PID"
  local keep=() p
  for p in "${PIDS[@]}"; do [[ $p == "$DAEMON_PID" ]] || keep+=("$p"); done
  PIDS=("${keep[@]}")
  rm -rf "$WORK/rstargz-root/cache"
  start_daemon
  local i
  for i in $(seq 300); do
    if ctrd snapshots --snapshotter stargz prepare "demo-probe-$i" >/dev/null 2>&1; then
      ctrd snapshots --snapshotter stargz rm "demo-probe-$i" >/dev/null
      return 0
    fi
    sleep 0.1
  done
  die "containerd cannot reach rstargz-grpc after its restart"
}

# `ctr containers create` has no --runc-root, and the runc shim would keep
# runc's state under /run/containerd/runc/<namespace>; a `runc` first on
# containerd's PATH moves that --root into $WORK.
runc_wrapper() {
  local real
  real=$(command -v runc) || die "runc not found"
  mkdir -p "$WORK/bin" "$WORK/runc"
  cat >"$WORK/bin/runc" <<EOF
#!/bin/bash
a=()
while ((\$#)); do
  if [[ \$1 == --root && \$2 == /run/containerd/runc/* ]]; then
    a+=(--root "$WORK/runc/\${2#/run/containerd/runc/}"); shift 2
  else a+=("\$1"); shift; fi
done
exec "$real" "\${a[@]}"
EOF
  chmod +x "$WORK/bin/runc"
}

start_containerd() {
  local d=$WORK/containerd
  mkdir -p "$d/root" "$d/state" "$d/opt"
  # Own root/state/sockets; CRI off (no Kubernetes here); rstargz-grpc is
  # the `stargz` proxy snapshotter.
  cat >"$WORK/containerd.toml" <<EOF
version = 2
root = "$d/root"
state = "$d/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$WORK/containerd.sock"
[ttrpc]
  address = "$WORK/containerd.ttrpc.sock"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$d/opt"
[proxy_plugins]
  [proxy_plugins.stargz]
    type = "snapshot"
    address = "$WORK/rstargz.sock"
EOF
  CURRENT_LOG=$WORK/containerd.log
  runc_wrapper
  PATH="$WORK/bin:$PATH" containerd --config "$WORK/containerd.toml" >"$WORK/containerd.log" 2>&1 &
  PIDS+=("$!")
  wait_ready containerd "$!" ctrd version
  wait_ready "containerd->stargz" "$!" ctrd snapshots --snapshotter stargz ls
  log "containerd on $WORK/containerd.sock"
}

# debootstrap minbase + python3-minimal, cached as a tarball. Built in a
# temp dir beside the cache and renamed into place, so an interrupted build
# never leaves a half cache; reruns reuse it.
python_rootfs() {
  mkdir -p "$CACHE/debs"
  if [[ -f $ROOTFS_TAR ]]; then
    log "reusing cached rootfs $ROOTFS_TAR"
    return
  fi
  local mirror tmp
  mirror=$(apt_mirror)
  tmp=$(mktemp -d "$CACHE/.build-XXXX")
  BUILD_TMP=$tmp
  log "debootstrap --variant=minbase --include=python3-minimal $SUITE (mirror from apt config; a few minutes)"
  CURRENT_LOG=$tmp/debootstrap.log
  if ! debootstrap --variant=minbase --include=python3-minimal --cache-dir="$CACHE/debs" \
      "$SUITE" "$tmp/rootfs" "$mirror" >"$tmp/debootstrap.log" 2>&1; then
    cp "$tmp/debootstrap.log" "$WORK/debootstrap.log" 2>/dev/null || true
    CURRENT_LOG=$WORK/debootstrap.log
    die "debootstrap failed (mirror $mirror)"
  fi
  unmount_under "$tmp/rootfs"
  # Device nodes, apt lists and the .debs debootstrap leaves in apt's
  # archive cache are left out: images ship none of them.
  tar --numeric-owner --sort=name -C "$tmp/rootfs" --exclude='./dev/*' --exclude='./proc/*' \
    --exclude='./sys/*' --exclude='./var/lib/apt/lists/*' \
    --exclude='./var/cache/apt/archives/*.deb' -cf "$tmp/rootfs.tar" .
  mv "$tmp/rootfs.tar" "$ROOTFS_TAR"
  rm -rf --one-file-system "$tmp"
  BUILD_TMP=""
}

# $1 = blobs dir, stdin = content; prints "<digest> <size>".
put_blob() {
  local f=$1/.tmp d
  cat >"$f"
  d=$(sha256sum "$f" | cut -d' ' -f1)
  mv "$f" "$1/$d"
  echo "sha256:$d $(stat -c %s "$1/$d")"
}

# A one-layer OCI layout tagged `1`: gzip layer, config with diff_ids,
# manifest, index.json, oci-layout.
make_oci_layout() {
  local dir=$WORK/oci blobs=$WORK/oci/blobs/sha256
  mkdir -p "$blobs"
  log "making the OCI layout (gzip of the rootfs)"
  local diff_id layer lsize
  # One pass: tee the tar into sha256sum (diff_id) and pigz (layer blob).
  # The DiffID is the digest of the uncompressed tar; hash it while pigz
  # compresses (the second read comes from the page cache).
  sha256sum "$ROOTFS_TAR" >"$WORK/diff_id" &
  local hasher=$!
  pigz -c <"$ROOTFS_TAR" >"$blobs/.layer"
  wait "$hasher"
  diff_id=sha256:$(cut -d' ' -f1 "$WORK/diff_id")
  read -r layer lsize < <(put_blob "$blobs" <"$blobs/.layer")
  rm -f "$blobs/.layer"
  local config cdig csize manifest mdig msize
  config=$(jq -cn --arg d "$diff_id" '{architecture:"amd64", os:"linux",
    config:{Env:["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            Cmd:["python3"], WorkingDir:"/"},
    rootfs:{type:"layers", diff_ids:[$d]},
    history:[{created_by:"rstargz demo: debootstrap minbase + python3-minimal"}]}')
  read -r cdig csize < <(printf '%s' "$config" | put_blob "$blobs")
  manifest=$(jq -cn --arg c "$cdig" --argjson cs "$csize" --arg l "$layer" --argjson ls "$lsize" \
    '{schemaVersion:2, mediaType:"application/vnd.oci.image.manifest.v1+json",
      config:{mediaType:"application/vnd.oci.image.config.v1+json", digest:$c, size:$cs},
      layers:[{mediaType:"application/vnd.oci.image.layer.v1.tar+gzip", digest:$l, size:$ls}]}')
  read -r mdig msize < <(printf '%s' "$manifest" | put_blob "$blobs")
  jq -cn --arg m "$mdig" --argjson ms "$msize" '{schemaVersion:2,
    mediaType:"application/vnd.oci.image.index.v1+json",
    manifests:[{mediaType:"application/vnd.oci.image.manifest.v1+json", digest:$m, size:$ms,
      platform:{architecture:"amd64", os:"linux"},
      annotations:{"org.opencontainers.image.ref.name":"1"}}]}' >"$dir/index.json"
  printf '{"imageLayoutVersion":"1.0.0"}' >"$dir/oci-layout"
}

push_layout() {
  # skopeo's default policy file may be missing or strict: use our own.
  printf '{"default":[{"type":"insecureAcceptAnything"}]}' >"$WORK/policy.json"
  SRC=$REG/demo/python:1
  log "pushing $SRC with skopeo"
  skopeo --policy "$WORK/policy.json" copy --quiet --preserve-digests \
    --dest-tls-verify=false "oci:$WORK/oci:1" "docker://$SRC"
}

# eStargz with `rstargz convert` (registry to registry), and an optimized
# one with `rstargz optimize` when this build has it.
convert_estargz() {
  ESGZ=$REG/demo/python:esgz
  CURRENT_LOG=$WORK/convert.log
  log "rstargz convert $SRC $ESGZ"
  "$BIN/rstargz" convert "$SRC" "$ESGZ" --plain-http >"$WORK/convert.log" 2>&1
  OPT=""
  if "$BIN/rstargz" optimize --help >/dev/null 2>&1; then
    OPT=$REG/demo/python:esgz-opt
    CURRENT_LOG=$WORK/optimize.log
    local args=() a
    for a in "${CMD[@]:1}"; do args+=("--args=$a"); done
    log "rstargz optimize $SRC $OPT (runs the workload once to record what it reads)"
    "$BIN/rstargz" optimize "$SRC" "$OPT" --plain-http --entrypoint "${CMD[0]}" "${args[@]}" \
      >"$WORK/optimize.log" 2>&1
  else
    log "this build has no 'rstargz optimize': the optimized row is left out"
  fi
}

# Sum of the layer sizes of $1 (name) : $2 (tag) in the registry (an index
# is resolved to its linux/amd64 manifest).
image_size() {
  local accept="application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json"
  local m d
  m=$(curl -sf -H "Accept: $accept" "http://$REG/v2/$1/manifests/$2")
  if jq -e '.manifests' <<<"$m" >/dev/null; then
    d=$(jq -r '[.manifests[] | select(.platform.os=="linux" and .platform.architecture=="amd64")][0].digest' <<<"$m")
    m=$(curl -sf -H "Accept: $accept" "http://$REG/v2/$1/manifests/$d")
  fi
  jq '[.layers[].size] | add' <<<"$m"
}

# Both runs start cold: no image, content or snapshot in containerd, and
# no file data in the page cache.
make_cold() {
  CURRENT_LOG=$WORK/containerd.log
  local imgs
  imgs=$(ctrd images ls -q)
  # --sync waits for the garbage collector to remove content and snapshots.
  [[ -z $imgs ]] || ctrd images rm --sync $imgs >/dev/null
  [[ -z $(ctrd images ls -q) ]] || die "images left in containerd"
  local n
  n=$(ctrd content ls -q | wc -l)
  ((n == 0)) || die "$n content blobs left in containerd after GC"
  sync
  echo 3 >/proc/sys/vm/drop_caches
}

# Creates container $2 from image $1 with snapshotter $3, then starts it
# attached; checks that it printed `hello`. Sets T_CREATE and T_RUN.
create_and_run() {
  local out t0 t1 t2
  t0=$(now)
  ctrd containers create --snapshotter "$3" -- "$1" "$2" "${CMD[@]}" >/dev/null
  t1=$(now)
  out=$(ctrd tasks start "$2")
  t2=$(now)
  [[ $out == hello ]] || die "container $2 printed '$out', not 'hello'"
  ctrd tasks delete "$2" >/dev/null 2>&1 || true
  ctrd containers delete "$2" >/dev/null
  T_CREATE=$(elapsed "$t0" "$t1"); T_RUN=$(elapsed "$t1" "$t2")
}

# One cold start of image $2 in mode $1 (ordinary | lazy); appends a row.
measure() {
  local mode=$1 ref=$2 label=$3 size=$4 l0 t0 t1 pull bytes
  make_cold
  if [[ $mode == lazy ]]; then
    restart_daemon_cold
    sync
    echo 3 >/proc/sys/vm/drop_caches
  fi
  log "$label: pull, create, run"
  CURRENT_LOG=$WORK/containerd.log
  l0=$(log_lines); t0=$(now)
  if [[ $mode == lazy ]]; then
    CURRENT_LOG=$WORK/rstargz.log
    ctrd_remote images rpull --plain-http --snapshotter stargz "$ref" >/dev/null
    t1=$(now)
    # Each lazily pulled layer is served by rstargz-grpc's FUSE.
    local fuse
    fuse=$(grep ' - fuse.rstargz ' /proc/self/mountinfo | grep -c -F "$WORK/" || true)
    ((fuse > 0)) || die "no fuse.rstargz mounts after rpull: the layers were not pulled lazily"
    create_and_run "$ref" "demo-$RANDOM" stargz
  else
    ctrd images pull --plain-http "$ref" >/dev/null
    t1=$(now)
    create_and_run "$ref" "demo-$RANDOM" overlayfs
  fi
  pull=$(elapsed "$t0" "$t1")
  bytes=$(blob_bytes_since "$l0")
  ROWS+=("| $label | $pull | $T_CREATE | $T_RUN | $(awk -v a="$pull" -v b="$T_CREATE" -v c="$T_RUN" 'BEGIN { printf "%.2f", a + b + c }') | $bytes ($(mib "$bytes")) | $(pct "$bytes" "$size") | $(mib "$size") |")
}

pct() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f%%", (b > 0 ? 100 * a / b : 0) }'; }
mib() { awk -v a="$1" 'BEGIN { printf "%.1f MiB", a / 1048576 }'; }

report() {
  local no_opt=""
  [[ -n ${OPT:-} ]] || no_opt=$'\n(No optimized row: this build has no `rstargz optimize`.)'
  cat <<EOF

## rstargz demo: \`python3 -c 'print("hello")'\` in a Debian $SUITE python3-minimal image

Every run is cold: no image, content or snapshot in containerd, an empty
rstargz cache, the page cache dropped. rstargz-grpc runs with
background_fetch = false, so the lazy bytes are what the pull and the
container actually read. Seconds per phase; bytes = blob bytes the registry
sent.

| mode | pull s | create s | run s | total s | bytes fetched | % of image | image (compressed) |
|---|---:|---:|---:|---:|---:|---:|---:|
$(printf '%s\n' "${ROWS[@]}")

All containers printed \`hello\`.${no_opt}
Demo wall time: $(elapsed "$T0" "$(now)") s.
EOF
}

main() {
  [[ $(id -u) == 0 ]] || { echo "run as root: sudo $0" >&2; exit 1; }
  build
  mkdir -p /var/tmp
  WORK=$(mktemp -d /var/tmp/rstargz-demo.XXXX)
  log "work dir $WORK"
  start_registry
  start_daemon
  start_containerd
  python_rootfs
  make_oci_layout
  push_layout
  convert_estargz
  ROWS=()
  measure ordinary "$SRC" "ordinary (overlayfs)" "$(image_size demo/python 1)"
  measure lazy "$ESGZ" "lazy eStargz, rstargz convert" "$(image_size demo/python esgz)"
  if [[ -n $OPT ]]; then
    measure lazy "$OPT" "lazy eStargz, rstargz optimize" "$(image_size demo/python esgz-opt)"
  fi
  report
}

main "$@"
