#!/usr/bin/env bash
# Put this checkout's `baifs` on PATH (for the README's commands and the
# systemd unit) and its mount(8) helper in /usr/sbin (`mount -t fuse.baifs`
# runs mount.fuse.baifs from /sbin, which is /usr/sbin on Debian 12).
# A baifs there that works and is another checkout's is left alone, so that
# a test run from a scratch clone does not take over the one you use;
# BAIFS_LINK=1 takes it over. Run by scripts/setup.sh, from the checkout.
# BAIFS_BIN_DIR and BAIFS_SBIN_DIR change where the links go.
set -euo pipefail
cd "$(dirname "$0")/.."

bin_dir=${BAIFS_BIN_DIR:-/usr/local/bin}
sbin_dir=${BAIFS_SBIN_DIR:-/usr/sbin}
if [[ ! -w "$bin_dir" ]]; then
    bin_dir="$HOME/.local/bin"
    mkdir -p "$bin_dir"
fi
ours="$PWD/.venv/bin/baifs"
link="$bin_dir/baifs"
if [[ -e "$link" || -L "$link" ]] && [[ "$(readlink -f "$link")" != "$(readlink -f "$ours")" ]] \
    && [[ "${BAIFS_LINK:-}" != 1 ]] && "$link" --version >/dev/null 2>&1; then
    echo "setup: $link is $(readlink -f "$link"), left as it is (BAIFS_LINK=1 makes it this checkout's)" >&2
    exit 0
fi
ln -sfn "$ours" "$link"
if [[ -w "$sbin_dir" ]]; then
    ln -sfn "$PWD/.venv/bin/mount.fuse.baifs" "$sbin_dir/mount.fuse.baifs"
fi
echo "setup: baifs is $link" >&2
