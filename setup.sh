#!/usr/bin/env bash
# One-shot setup for themis-pg on Debian bookworm (run as root, or with sudo available).
#
#   bash setup.sh deps    install system packages, pgvector and the .venv virtualenv
#   bash setup.sh demo    deps, then `themis demo` (cluster, models, sample corpus, a question)
#   bash setup.sh test    deps, then the test suite (extra arguments go to pytest)
#
# Safe to re-run: each step is skipped when its result is already there, so a second run on a
# prepared machine takes seconds.  Debian's own 'main' cluster (port 5432) is left alone: the
# themis CLI runs its own cluster under THEMIS_HOME.
set -euo pipefail

PG_MAJOR=15
APT_PACKAGES=(
  "postgresql-$PG_MAJOR" "postgresql-plpython3-$PG_MAJOR" "postgresql-server-dev-$PG_MAJOR"
  dpkg-dev build-essential cmake ca-certificates
  python3 python3-venv python3-dev python3-psycopg
)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV="$ROOT/.venv"
PG_CONFIG="/usr/lib/postgresql/$PG_MAJOR/bin/pg_config"

say() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'setup.sh: %s\n' "$*" >&2; exit 1; }

as_root() {  # system changes need root; use sudo when this is not root
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else die "'$*' needs root: re-run setup.sh as root"
  fi
}
apt_get() { as_root env DEBIAN_FRONTEND=noninteractive apt-get -y -q "$@"; }

missing_packages() {  # prints the packages of "$@" that dpkg does not have installed
  local pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null | grep -q '^ii' || echo "$pkg"
  done
}

install_apt_packages() {
  local missing
  mapfile -t missing < <(missing_packages "${APT_PACKAGES[@]}")
  if [ "${#missing[@]}" -eq 0 ]; then
    say "system packages: all installed"
    return
  fi
  say "system packages: installing ${missing[*]}"
  # A machine whose CA bundle was put in place by hand (no ca-certificates package yet) would
  # lose those certificates when the package rebuilds the bundle: keep them as a local CA file.
  local bundle=/etc/ssl/certs/ca-certificates.crt keep=""
  if printf '%s\n' "${missing[@]}" | grep -qx ca-certificates && [ -s "$bundle" ]; then
    keep=$(mktemp); cp "$bundle" "$keep"
  fi
  apt_get update
  apt_get install --no-install-recommends "${missing[@]}"
  if [ -n "$keep" ]; then
    if ! cmp -s "$keep" "$bundle"; then
      as_root install -D -m 644 "$keep" /usr/local/share/ca-certificates/themis-preserved-bundle.crt
      as_root update-ca-certificates >/dev/null
    fi
    rm -f "$keep"
  fi
}

debian_mirror() {  # the first Debian mirror this machine's apt already uses
  local uri=""
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  fi
  if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
    uri=$(awk '$1 == "deb" { sub(/\[[^]]*\]/, ""); $0 = $0; print $2; exit }' /etc/apt/sources.list)
  fi
  [ -n "$uri" ] || die "cannot find a Debian mirror in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list"
  echo "$uri"
}

build_pgvector_from_trixie() {
  # pgvector is not packaged for bookworm; Debian trixie's source package builds unchanged
  # against PostgreSQL 15.  apt fetches it from this machine's own mirror, with a throwaway
  # source list so the system's apt configuration is untouched.
  local mirror work
  mirror=$(debian_mirror)
  work=$(mktemp -d)
  chmod 755 "$work"
  mkdir -p "$work/lists/partial"
  cat > "$work/trixie-src.sources" <<EOF
Types: deb-src
URIs: $mirror
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  local apt_opts=(-o "Dir::Etc::SourceList=$work/trixie-src.sources" -o Dir::Etc::SourceParts=/dev/null
                  -o "Dir::State::Lists=$work/lists" -o APT::Sandbox::User=root)
  say "pgvector: building Debian trixie's source package from $mirror"
  (
    cd "$work"
    apt-get -q "${apt_opts[@]}" update
    apt-get -q "${apt_opts[@]}" source --download-only pgvector
    dpkg-source -x pgvector_*.dsc src >/dev/null
    make -C src -s PG_CONFIG="$PG_CONFIG" OPTFLAGS="" -j"$(nproc)"
    as_root make -C src -s PG_CONFIG="$PG_CONFIG" install
  )
  rm -rf "$work"
}

install_pgvector() {
  local extdir
  extdir="$("$PG_CONFIG" --sharedir)/extension"
  if [ -f "$extdir/vector.control" ]; then
    say "pgvector: already installed"
    return
  fi
  local pkg="postgresql-$PG_MAJOR-pgvector"
  if apt-cache policy "$pkg" 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    say "pgvector: installing $pkg"
    apt_get install --no-install-recommends "$pkg"
  else
    build_pgvector_from_trixie
  fi
  [ -f "$extdir/vector.control" ] || die "pgvector install failed: $extdir/vector.control is missing"
}

install_venv() {
  # The project's own virtualenv, made from the system Python (the same 3.11 that runs inside
  # PostgreSQL).  A stamp of pyproject.toml skips pip when nothing changed since the last run.
  local stamp="$VENV/.themis-setup-stamp" want
  want=$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)
  if [ ! -x "$VENV/bin/python" ]; then
    say "virtualenv: creating $VENV"
    /usr/bin/python3 -m venv "$VENV"
  fi
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    say "virtualenv: up to date (pyproject.toml unchanged)"
    return
  fi
  say "virtualenv: pip install -e '.[test]' (a first build of llama-cpp-python takes ~5 min)"
  # No llava: the project never loads vision models, and it saves build time.
  CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" \
    "$VENV/bin/python" -m pip install --disable-pip-version-check -e "$ROOT[test]"
  echo "$want" > "$stamp"
}

deps() {
  install_apt_packages
  install_pgvector
  install_venv
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  deps)
    deps
    say "done: activate with 'source .venv/bin/activate', or run .venv/bin/themis"
    ;;
  demo)
    deps
    say "demo: .venv/bin/themis demo $*"
    cd "$ROOT"
    exec "$VENV/bin/themis" demo "$@"
    ;;
  test)
    deps
    say "test: .venv/bin/python -m pytest $*"
    cd "$ROOT"
    rc=0
    "$VENV/bin/python" -m pytest "$@" || rc=$?
    # Exit code 5 means no test was collected: a broken suite, not a pass.
    [ "$rc" -ne 5 ] || say "pytest collected no tests"
    exit "$rc"
    ;;
  *)
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
