#!/usr/bin/env bash
# Installs the Debian packages that `make demo`, `make test` and `make bench` need, when missing.
# Needs root (or sudo) only when something is actually missing.
set -euo pipefail
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v smtp-sink    >/dev/null 2>&1 || need+=(postfix)
command -v promtool     >/dev/null 2>&1 || need+=(prometheus)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
  echo "notifier: missing ${need[*]}; install them with: apt-get install ${need[*]}" >&2; exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "notifier: missing ${need[*]} and no apt-get here; install them with your package manager" >&2; exit 1
fi
echo "notifier: installing ${need[*]} from Debian packages" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The packages we just installed may start system daemons; we only want their binaries.
# Only what this script installed is stopped: a Redis you already run is never touched.
for pkg in "${need[@]}"; do
  case "$pkg" in
    postfix) $SUDO postfix stop >/dev/null 2>&1 || true; svc=postfix ;;
    redis-server) svc=redis-server ;;
    prometheus) svc=prometheus ;;
  esac
  $SUDO systemctl disable --now "$svc" >/dev/null 2>&1 || true
done
