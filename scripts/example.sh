#!/usr/bin/env bash
# The main job on the example specs, with the embedded defaults (an SQLite file in the data
# directory): validate examples/, reconcile them once, and show the result.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
cargo build --release --locked --quiet
agentops=target/release/agentops
$agentops validate examples
$agentops reconcile --once --repo examples
$agentops status
