#!/usr/bin/env bash
# Installs (or upgrades, or removes) notifier as a systemd service. Idempotent: run it again
# after `git pull` to upgrade; existing configuration and secrets are never overwritten.
#
#   sudo deploy/install.sh                 # /opt/notifier/venv, /etc/notifier, systemd units
#   sudo deploy/install.sh --dry-run       # print what it would do, change nothing
#   sudo deploy/install.sh --uninstall     # remove the venv and the units, keep /etc/notifier
#   sudo deploy/install.sh --uninstall --purge   # ... and /etc/notifier too
#
# Layout it creates:
#   $prefix/venv/                 python3 -m venv + pip install of the project (not editable)
#   $etc/notifier.env             from .env.example, mode 0640, only if absent
#   $etc/smtp_password            empty, mode 0600, only if absent (systemd LoadCredential=)
#   $unit_dir/notifier.service, $unit_dir/notifier@.service
set -euo pipefail
umask 022 # the venv must be readable by the service's dynamic user

usage() {
  cat <<'EOF'
usage: install.sh [options]
  --prefix DIR    where the venv goes            (default /opt/notifier)
  --etc DIR       configuration and secrets      (default /etc/notifier)
  --unit-dir DIR  systemd unit directory         (default /etc/systemd/system)
  --root DIR      prepend DIR to the three above (tests, packaging); implies --no-systemctl
  --source DIR    the project to pip install     (default: the repo holding this script)
  --python EXE    interpreter for the venv, 3.11+ (default python3)
  --no-pip        create the layout only, with a stub venv/bin/notifier (tests)
  --no-systemctl  skip `systemctl daemon-reload` (also skipped when systemd is not running)
  --dry-run       print each action, change nothing
  --uninstall     remove the venv and the units; keep the configuration
  --purge         with --uninstall: remove the configuration and secrets too
  -h, --help      this text
EOF
}

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
prefix=/opt/notifier
etc=/etc/notifier
unit_dir=/etc/systemd/system
root=""
repo_root=$(cd "$script_dir/.." && pwd) # .env.example and README.md come from here
source_dir=$repo_root
python=python3
pip=1
use_systemctl=1
dry_run=0
uninstall=0
purge=0

die() {
  echo "install.sh: $*" >&2
  exit 2
}
need_arg() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value (see --help)"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) need_arg "$@"; prefix=$2; shift 2 ;;
    --etc) need_arg "$@"; etc=$2; shift 2 ;;
    --unit-dir) need_arg "$@"; unit_dir=$2; shift 2 ;;
    --root) need_arg "$@"; root=$2; shift 2 ;;
    --source) need_arg "$@"; source_dir=$2; shift 2 ;;
    --python) need_arg "$@"; python=$2; shift 2 ;;
    --no-pip) pip=0; shift ;;
    --no-systemctl) use_systemctl=0; shift ;;
    --dry-run) dry_run=1; shift ;;
    --uninstall) uninstall=1; shift ;;
    --purge) purge=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
done

[ "$purge" -eq 0 ] || [ "$uninstall" -eq 1 ] || die "--purge only goes with --uninstall"
for dir in "$prefix" "$etc" "$unit_dir"; do
  case "$dir" in
    /?*) ;;
    *) die "paths must be absolute and not /: '$dir'" ;;
  esac
done
if [ -n "$root" ]; then
  case "$root" in /*) ;; *) root="$PWD/$root" ;; esac
  root=${root%/}
  [ -n "$root" ] || die "--root / is the default; leave it out"
  prefix="$root$prefix"
  etc="$root$etc"
  unit_dir="$root$unit_dir"
  use_systemctl=0 # a unit under another root is not this host's systemd's business
fi
prefix=${prefix%/}
etc=${etc%/}
unit_dir=${unit_dir%/}
venv="$prefix/venv"
units=(notifier.service notifier@.service)

if [ "$use_systemctl" -eq 1 ] && ! { command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; }; then
  echo "install.sh: systemd is not running here; skipping systemctl" >&2
  use_systemctl=0
fi

# --- actions: each one is printed; with --dry-run nothing else happens ------------------------
say() {
  if [ "$dry_run" -eq 1 ]; then echo "[dry-run] $*"; else echo "+ $*"; fi
}
run() {
  say "$*"
  [ "$dry_run" -eq 1 ] || "$@"
}
note() { echo "  $*"; }

make_dir() { # make_dir MODE DIR
  if [ -d "$2" ]; then note "exists: $2"; else run install -d -m "$1" "$2"; fi
}
copy_if_absent() { # copy_if_absent MODE SRC DEST (never overwrites: it may hold edits)
  if [ -e "$3" ]; then note "kept: $3 (exists)"; else run install -m "$1" "$2" "$3"; fi
}
copy_if_changed() { # copy_if_changed MODE SRC DEST (files we own: units, docs)
  if [ -f "$3" ] && cmp -s "$2" "$3"; then note "unchanged: $3"; else run install -m "$1" "$2" "$3"; fi
}
remove() { # remove PATH...
  local path
  for path in "$@"; do
    if [ -e "$path" ] || [ -L "$path" ]; then run rm -rf -- "$path"; else note "absent: $path"; fi
  done
}
systemctl_quiet() { # systemctl_quiet ARGS...: failures are reported, not fatal
  run systemctl "$@" || echo "install.sh: systemctl $* failed (continuing)" >&2
}

# --- uninstall ---------------------------------------------------------------------------------
if [ "$uninstall" -eq 1 ]; then
  if [ "$use_systemctl" -eq 1 ]; then
    systemctl_quiet disable --now notifier.service
    systemctl_quiet stop 'notifier@*.service'
    systemctl_quiet disable notifier@.service
  fi
  # Enablement symlinks left behind (always the case under --root).
  shopt -s nullglob
  remove "$unit_dir"/*.wants/notifier.service "$unit_dir"/*.wants/notifier@*.service
  shopt -u nullglob
  remove "${units[@]/#/$unit_dir/}" "$venv" "$prefix/README.md"
  if [ -d "$prefix" ] && [ -z "$(ls -A "$prefix")" ]; then run rmdir "$prefix"; fi
  if [ "$purge" -eq 1 ]; then
    # Only our files, then the directory if that left it empty: --etc may be shared.
    shopt -s nullglob
    remove "$etc/notifier.env" "$etc/smtp_password" "$etc"/notifier-*.env
    shopt -u nullglob
    if [ -d "$etc" ] && [ -z "$(ls -A "$etc")" ]; then
      run rmdir "$etc"
    elif [ -d "$etc" ]; then
      note "kept: $etc (holds other files)"
    fi
  else
    note "kept: $etc (configuration and secrets; --purge removes them)"
  fi
  [ "$use_systemctl" -eq 0 ] || systemctl_quiet daemon-reload
  echo "notifier uninstalled."
  exit 0
fi

# --- install -----------------------------------------------------------------------------------
for unit in "${units[@]}"; do
  [ -f "$script_dir/$unit" ] || die "missing $script_dir/$unit"
done
if [ "$pip" -eq 1 ]; then
  [ -f "$source_dir/pyproject.toml" ] || die "no pyproject.toml in --source $source_dir"
  command -v "$python" >/dev/null 2>&1 || die "no $python; install Python 3.11+ or pass --python"
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "$python is older than 3.11; pass --python python3.11 (or newer)"
fi

make_dir 0755 "$prefix"
if [ "$pip" -eq 1 ]; then
  if [ -x "$venv/bin/python" ]; then note "exists: $venv"; else run "$python" -m venv "$venv"; fi
  run "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  # Not editable, so the service keeps working when the checkout moves or changes; and
  # built from a copy, so a sudo run leaves no root-owned build/ or *.egg-info in it.
  build_dir="<temporary copy>"
  say "copy $source_dir to a temporary directory (without .git, .venv, caches)"
  if [ "$dry_run" -eq 0 ]; then
    build_dir=$(mktemp -d)
    trap 'rm -rf -- "$build_dir"' EXIT
    tar -C "$source_dir" --exclude=./.git --exclude=./.venv --exclude=./build \
      --exclude='*.egg-info' --exclude=__pycache__ --exclude='.*_cache' -cf - . |
      tar -C "$build_dir" -xf -
  fi
  run "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "$build_dir"
else
  make_dir 0755 "$venv"
  make_dir 0755 "$venv/bin"
  if [ -e "$venv/bin/notifier" ]; then
    note "exists: $venv/bin/notifier"
  else
    say "write stub $venv/bin/notifier (--no-pip)"
    if [ "$dry_run" -eq 0 ]; then
      printf '%s\n' '#!/bin/sh' \
        'echo "notifier: installed with --no-pip; run deploy/install.sh without it" >&2' \
        'exit 1' >"$venv/bin/notifier"
      chmod 0755 "$venv/bin/notifier"
    fi
  fi
fi
if [ -f "$repo_root/README.md" ]; then copy_if_changed 0644 "$repo_root/README.md" "$prefix/README.md"; fi

make_dir 0750 "$etc"
if [ -f "$repo_root/.env.example" ]; then
  copy_if_absent 0640 "$repo_root/.env.example" "$etc/notifier.env"
elif [ -e "$etc/notifier.env" ]; then
  note "kept: $etc/notifier.env (exists)"
else
  say "write $etc/notifier.env (no .env.example in $repo_root: a minimal one)"
  if [ "$dry_run" -eq 0 ]; then
    (umask 027 && printf '%s\n' '# notifier settings (NOTIFIER_*); see README.md' \
      '#NOTIFIER_SMTP_PROVIDER=qq' '#NOTIFIER_SMTP_USERNAME=' '#NOTIFIER_MAIL_TO=' \
      >"$etc/notifier.env")
    chmod 0640 "$etc/notifier.env"
  fi
fi
if [ -e "$etc/smtp_password" ]; then
  note "kept: $etc/smtp_password (exists)"
  mode=$(stat -c %a "$etc/smtp_password" 2>/dev/null || echo "?")
  [ "$mode" = 600 ] || [ "$mode" = 400 ] ||
    echo "install.sh: warning: $etc/smtp_password has mode $mode; chmod 600 it" >&2
else
  run install -m 0600 /dev/null "$etc/smtp_password"
fi

make_dir 0755 "$unit_dir"
for unit in "${units[@]}"; do
  copy_if_changed 0644 "$script_dir/$unit" "$unit_dir/$unit"
done
if [ "$use_systemctl" -eq 1 ]; then systemctl_quiet daemon-reload; fi

cat <<EOF

notifier installed$([ "$dry_run" -eq 0 ] || echo " (dry run: nothing was changed)"). Next steps:
  1. edit $etc/notifier.env (SMTP provider, username, MAIL_FROM, MAIL_TO, REDIS_URL)
  2. put the SMTP password in $etc/smtp_password, keeping mode 0600 (QQ/163 mail:
     the 16-character authorization code, not the web login password)
  3. check settings, Redis and the SMTP login with the service's own environment:
       systemd-run --wait --pipe -p DynamicUser=yes -p EnvironmentFile=$etc/notifier.env \\
         -p Environment=NOTIFIER_ENV_FILE=/dev/null \\
         -p LoadCredential=smtp_password:$etc/smtp_password $venv/bin/notifier check
  4. systemctl enable --now notifier   (several workers: notifier@1 notifier@2 ...; instance N
     serves /metrics on NOTIFIER_METRICS_PORT plus N)
     then: systemctl status notifier; journalctl -u notifier -f; $venv/bin/notifier stats
     (the CLI reads $etc/notifier.env from any directory: run it as root)
  Upgrade: git pull && sudo deploy/install.sh && sudo systemctl restart notifier
EOF
