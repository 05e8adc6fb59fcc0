#!/usr/bin/env bash
# Install everything baifs needs on Debian 12, as root: the system packages
# (FUSE, the build tools for pyfuse3, bubblewrap for `baifs serve`, and the
# programs the tests and benchmarks drive), a virtual environment in .venv,
# and baifs itself with its test extras. Safe to run again: it installs only
# what is missing. Links `baifs` into /usr/local/bin (or ~/.local/bin when
# that is not writable).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
    fuse3 libfuse3-dev pkg-config gcc python3 python3-venv python3-dev
    bubblewrap git vim nano rsync sshfs openssh-server procps
)
missing=()
for package in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$package")
    fi
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    echo "setup: creating .venv with $("$python" --version)" >&2
    "$python" -m venv .venv
fi
echo "setup: installing baifs into .venv" >&2
pip_log=$(mktemp)
if ! .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]" >"$pip_log" 2>&1; then
    cat "$pip_log" >&2
    rm -f "$pip_log"
    echo "setup: pip install failed" >&2
    exit 1
fi
rm -f "$pip_log"
.venv/bin/baifs --version >/dev/null
# `baifs` on PATH, for the README's commands and the systemd unit (and
# `mount -t fuse.baifs`, which runs mount.fuse.baifs from /sbin or /usr/sbin).
bin_dir=/usr/local/bin
if [[ ! -w "$bin_dir" ]]; then
    bin_dir="$HOME/.local/bin"
    mkdir -p "$bin_dir"
fi
ln -sfn "$PWD/.venv/bin/baifs" "$bin_dir/baifs"
echo "setup: baifs is $bin_dir/baifs" >&2
if [[ -w /usr/sbin ]]; then  # mount(8) looks for helpers in /sbin (= /usr/sbin on Debian 12)
    ln -sfn "$PWD/.venv/bin/mount.fuse.baifs" /usr/sbin/mount.fuse.baifs
fi
# The man page and shell completions, generated from baifs's own arguments.
if [[ -w /usr/local/share ]]; then
    mkdir -p /usr/local/share/man/man1 /usr/local/share/zsh/site-functions
    .venv/bin/baifs manpage > /usr/local/share/man/man1/baifs.1
    .venv/bin/baifs completion zsh > /usr/local/share/zsh/site-functions/_baifs
fi
if [[ -d /etc/bash_completion.d && -w /etc/bash_completion.d ]]; then
    .venv/bin/baifs completion bash > /etc/bash_completion.d/baifs
fi
echo "setup: done" >&2
