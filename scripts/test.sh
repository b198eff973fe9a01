#!/usr/bin/env bash
# Runs every test: unit, integration, conformance and end to end (real
# containerd, registry and FUSE). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
cargo test --all-targets --no-fail-fast -- --test-threads=2
