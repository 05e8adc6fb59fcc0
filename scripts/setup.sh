#!/usr/bin/env bash
# Install everything baifs needs on Debian 12, as root: the system packages
# (FUSE, the build tools for pyfuse3, bubblewrap for `baifs serve`, and the
# programs the tests and benchmarks drive; debootstrap makes the Debian 13 root
# the official 26.9 client needs for its Python 3.13), a virtual environment in .venv,
# and baifs itself with its test extras. Safe to run again: it installs only
# what is missing. Links `baifs` into /usr/local/bin (or ~/.local/bin when
# that is not writable), unless it is another checkout's that works
# (scripts/link-baifs.sh; BAIFS_LINK=1 takes it over).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
    fuse3 libfuse3-dev pkg-config gcc python3 python3-venv python3-dev
    bubblewrap git vim nano rsync sshfs openssh-server procps bash-completion man-db debootstrap
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
bash scripts/link-baifs.sh
# The man page and shell completions, generated from baifs's own arguments.
# bash-completion loads completions/baifs the first time `baifs` is completed.
if [[ -w /usr/local/share ]]; then
    mkdir -p /usr/local/share/man/man1 /usr/local/share/zsh/site-functions \
        /usr/local/share/bash-completion/completions
    # Through a new file, so that the directory changes and mandb looks at it again.
    .venv/bin/baifs manpage > /usr/local/share/man/man1/baifs.1.new
    mv -f /usr/local/share/man/man1/baifs.1.new /usr/local/share/man/man1/baifs.1
    .venv/bin/baifs completion zsh > /usr/local/share/zsh/site-functions/_baifs
    .venv/bin/baifs completion bash > /usr/local/share/bash-completion/completions/baifs
    rm -f /etc/bash_completion.d/baifs  # where an older setup put it (loaded in every shell)
    if command -v mandb >/dev/null; then
        mandb -q 2>/dev/null || true  # so that whatis and apropos know baifs
    fi
fi
echo "setup: done" >&2
