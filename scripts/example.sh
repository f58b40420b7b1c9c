#!/usr/bin/env bash
# The main job, end to end, offline (unless OPENROUTER_API_KEY is set): examples/ copied into a
# fresh Git repository behind a bare remote; `agentops up` with its embedded agents (Seed, Chief
# of Staff, the example specialists) runs until no task can move; result branches are merged as
# a reviewer would, and `up` runs again until every task is completed. Then `agentops ask`
# proposes a new project on a branch, which is merged and run the same way.
#
# AGENTOPS_BIN=path/to/agentops skips the release build (scripts/test.sh passes its debug build).
# Exits 0 when every task completed, non-zero on the first step that fails.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${AGENTOPS_BIN:-}" ]; then
  source scripts/deps.sh
  cargo build --release --locked --quiet --bin agentops
  AGENTOPS_BIN=$(cd "${CARGO_TARGET_DIR:-target}/release" && pwd)/agentops
fi
agentops=$AGENTOPS_BIN

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# examples/kubernetes/ declares the same objects as custom resources, for a cluster.
cp -r examples "$work/specs"
rm -rf "$work/specs/kubernetes"
$agentops validate "$work/specs"
person=(-c user.name=reviewer -c user.email=reviewer@example.com)
git -C "$work/specs" init -q -b main
git -C "$work/specs" add -A
git -C "$work/specs" "${person[@]}" commit -qm "example specs"
git clone -q --bare "$work/specs" "$work/remote.git"
git clone -q "$work/remote.git" "$work/review"

export AGENTOPS_REPO="file://$work/remote.git"
export AGENTOPS_DATABASE_URL="sqlite://$work/agentops.db"
export AGENTOPS_DATA_DIR="$work/data"
export AGENTOPS_LISTEN=127.0.0.1:0
export AGENTOPS_STATUS_INTERVAL=200ms
export AGENTOPS_LOG=warn

# The reviewer merges every result branch (proposals stay for a person to read).
merge_results() {
  git -C "$work/review" fetch -q --prune origin
  git -C "$work/review" reset -q --hard origin/main
  for branch in $(git -C "$work/review" branch -r --format='%(refname:short)' \
      | grep '^origin/agentops/' | grep -v '^origin/agentops/proposals/'); do
    echo "merging $branch"
    git -C "$work/review" "${person[@]}" merge -q --no-edit "$branch"
  done
  git -C "$work/review" push -q origin main
}

run_until_done() {
  for _ in $(seq 1 12); do
    $agentops up --exit-when-idle
    # Captured first: `grep -q` stops reading at its first match, and under pipefail the
    # writer's broken pipe would read as "nothing left to do".
    status=$($agentops status --format json)
    if ! grep -Eq '"status":"(pending|in_progress|review)"' <<<"$status"; then
      return
    fi
    merge_results
  done
  echo "some tasks did not complete" >&2
  exit 1
}

run_until_done
$agentops status

branch=$($agentops ask "Onboard our first customers.
- Write a welcome note
- List three next steps
- Draft a follow-up email" --project onboarding | sed -n 's/^branch //p')
echo "the Chief of Staff proposed $branch"
git -C "$work/review" fetch -q origin
git -C "$work/review" "${person[@]}" merge -q --no-edit "origin/$branch"
git -C "$work/review" push -q origin main
run_until_done
$agentops status
git -C "$work/review" fetch -q origin
git -C "$work/review" log --oneline -n 20 origin/main
