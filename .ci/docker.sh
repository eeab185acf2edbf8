#!/usr/bin/env bash
# Docker set-up for the container tests and `make image`, idempotent. Run from anywhere:
#   bash .ci/docker.sh engine   a Docker engine that answers: installs Debian's docker.io when dockerd is
#                               missing, starts dockerd (log: $DOCKERD_LOG) when none answers, waits for it
#   bash .ci/docker.sh base     the local base image $BASE_IMAGE (default atmask-base:bookworm): Debian
#                               bookworm + python3.11 + venv + CA certificates from Debian's packages
#                               (debootstrap, about a minute), made only when the engine does not have it
# No container registry is needed. On failure the last line of output says why; exit status 77 means
# "impossible here" (not root, no apt-get, dockerd cannot run in this sandbox), anything else is an error.
set -euo pipefail
BASE_IMAGE="${BASE_IMAGE:-atmask-base:bookworm}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DOCKERD_LOG="${DOCKERD_LOG:-/tmp/atmask-dockerd.log}"
# Debian's client: it runs BuildKit builds (DOCKER_BUILDKIT=1) without the buildx plugin.
DOCKER="${DOCKER:-/usr/bin/docker}"

impossible() { echo "docker set-up impossible here: $*"; exit 77; }

answers() { [ -x "$DOCKER" ] && timeout 20 "$DOCKER" info >/dev/null 2>&1; }

can_root() { [ "$(id -u)" -eq 0 ] || { command -v sudo >/dev/null && sudo -n true 2>/dev/null; }; }
need_root() { can_root || impossible "$* needs root (run as root or with password-less sudo)"; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

engine() {
  if answers; then echo "docker: engine answers"; return; fi
  if ! [ -x /usr/sbin/dockerd ] || ! [ -x "$DOCKER" ]; then
    command -v apt-get >/dev/null || impossible "no Docker engine and no apt-get to install Debian's docker.io"
    need_root "installing Debian's docker.io"
    echo "docker: installing Debian's docker.io"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null \
      || { as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null; } \
      || impossible "apt-get install docker.io failed"
  fi
  if [ -S /var/run/docker.sock ] && ! [ -w /var/run/docker.sock ] && ! can_root; then
    impossible "the Docker engine's socket /var/run/docker.sock is not this user's: add $(id -un) to group docker"
  fi
  if ! [ -S /var/run/docker.sock ] || ! answers; then
    need_root "starting dockerd"
    echo "docker: starting dockerd (log: $DOCKERD_LOG)"
    as_root sh -c "nohup /usr/sbin/dockerd >'$DOCKERD_LOG' 2>&1 &"
  fi
  for _ in $(seq 60); do
    if answers; then echo "docker: engine answers"; return; fi
    sleep 1
  done
  impossible "dockerd did not answer within 60 s: $(tail -n 1 "$DOCKERD_LOG" 2>/dev/null | cut -c1-200)"
}

base() {
  answers || impossible "no Docker engine answers (run: bash .ci/docker.sh engine)"
  if "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then echo "docker: $BASE_IMAGE present"; return; fi
  if ! command -v debootstrap >/dev/null; then
    command -v apt-get >/dev/null || impossible "debootstrap is missing and there is no apt-get to install it"
    need_root "installing debootstrap"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null \
      || { as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
  fi
  BASE_ROOT="$(mktemp -d /tmp/atmask-base.XXXXXX)"
  trap 'as_root rm -rf "$BASE_ROOT"' EXIT
  local root="$BASE_ROOT"
  need_root "debootstrap"
  echo "docker: debootstrap bookworm into $root (about a minute)"
  as_root debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" "$DEBIAN_MIRROR" >"$root.log" 2>&1 \
    || { tail -n 5 "$root.log"; echo "docker: debootstrap failed (log: $root.log); check that $DEBIAN_MIRROR is reachable"; exit 1; }
  as_root rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root.log"
  as_root tar -C "$root" -c . | "$DOCKER" import \
    -c 'ENV LANG=C.UTF-8' -c 'CMD ["python3"]' \
    -m "Debian bookworm minbase + python3 python3-venv ca-certificates (debootstrap)" - "$BASE_IMAGE" >/dev/null
  echo "docker: built $BASE_IMAGE ($("$DOCKER" image inspect -f '{{.Size}}' "$BASE_IMAGE") bytes)"
}

case "${1:-}" in
  engine) engine ;;
  base) engine && base ;;
  *) echo "usage: $0 engine|base" >&2; exit 2 ;;
esac
