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

ensure_redis() {
  need redis-server && need redis-cli || apt_install redis-server redis-tools
  # The package may start a system-wide server; nothing here uses it.
}
