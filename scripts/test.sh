#!/usr/bin/env bash
# The test command: starts (and if needed installs) PostgreSQL, Redis and NATS JetStream,
# then runs formatting and lint checks, the example (scripts/example.sh) and every test of the
# workspace against them.
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/deps.sh

service_packages=()
command -v pg_ctlcluster >/dev/null || service_packages+=(postgresql)
command -v redis-server >/dev/null || service_packages+=(redis-server)
command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || service_packages+=(nats-server)
apt_install "${service_packages[@]}"

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
  for _ in $(seq 1 50); do port_open "$1" && return 0; sleep 0.2; done
  echo "$2 did not start on port $1" >&2; return 1
}

if ! port_open 5432; then
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start
  wait_port 5432 PostgreSQL
  # A fresh package install only lets the postgres user in with a password over TCP; the
  # tests log in as postgres/postgres (a trust-auth server ignores the password).
  as_root su postgres -c "psql -qc \"ALTER USER postgres PASSWORD 'postgres'\"" || true
fi
if ! port_open 6379; then
  as_root mkdir -p /var/lib/redis /var/log/redis
  as_root redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/agentops-test.log
  wait_port 6379 Redis
fi
if ! port_open 4222; then
  nats=$(command -v nats-server || echo /usr/sbin/nats-server)
  as_root mkdir -p /var/lib/nats-server
  as_root start-stop-daemon --start --oknodo --background --exec "$nats" -- \
    -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
  wait_port 4222 NATS
fi

export AGENTOPS_TEST_POSTGRES="${AGENTOPS_TEST_POSTGRES:-postgres://postgres:postgres@127.0.0.1:5432/postgres}"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The process tests and the example run these binaries. They are built with the workspace's
# features, as `cargo test --workspace` and the tests themselves (`agent_run_bin`) build them,
# so that the tests reuse every dependency compiled here: built alone (`-p agentops-agents`),
# the agent's dependencies got other features and were compiled twice, 3.5 of the 21 minutes
# of a clean run on a slow host.
cargo build --workspace --bin agentops-agent-run --bin agentops --locked
# The main job, end to end with the binary just built: CI fails when the example does not
# finish. Offline even where a model key is set, so that it is the same run everywhere.
AGENTOPS_BIN="$(cd "${CARGO_TARGET_DIR:-target}/debug" && pwd)/agentops" \
  env -u OPENROUTER_API_KEY scripts/example.sh
# --all-targets leaves out doc tests: there are none, and their empty summary would be the
# run's last line.
cargo test --workspace --all-targets --locked "$@"
