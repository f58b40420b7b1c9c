#!/usr/bin/env bash
# Outline every markdown file in a folder: its name and headings (a tool the Seed runs for
# `tool: outline`).
set -euo pipefail
folder=$1 out=$2
mkdir -p "$(dirname "$out")"
{
  echo "# Outline of $folder"
  for f in "$folder"/*.md; do
    [ -e "$f" ] && [ "$f" != "$out" ] || continue
    echo
    echo "## $(basename "$f")"
    grep -E '^#+ ' "$f" | sed 's/^/- /' || echo "- (no headings)"
  done
} > "$out"
