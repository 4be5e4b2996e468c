#!/usr/bin/env bash
# Create (or reuse) one of privtrain's two Python environments from its exact-pin lock file.
#   scripts/setup_env.sh platform|encrypted      -> prints the environment's directory on stdout
# Environments live under $PRIVTRAIN_ENV_ROOT (default ~/.cache/privtrain/envs), keyed by a hash of the
# lock file, so a second run with an unchanged lock returns in well under a second and clones share them.
set -euo pipefail
name="${1:?usage: setup_env.sh platform|encrypted}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
lock="$repo/env/$name.lock.txt"
[ -f "$lock" ] || { echo "setup_env: unknown environment '$name' (no $lock); use 'platform' or 'encrypted'" >&2; exit 2; }

find_python310() {
  local cand
  for cand in "${PRIVTRAIN_PYTHON:-}" "$(command -v python3.10 2>/dev/null || true)"; do
    [ -n "$cand" ] && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 10)' >/dev/null 2>&1 && { echo "$cand"; return 0; }
  done
  local root="${PYENV_ROOT:-$HOME/.pyenv}"
  command -v pyenv >/dev/null 2>&1 && root="$(pyenv root)"
  for cand in "$root"/versions/3.10*/bin/python3.10 /usr/bin/python3.10 /usr/local/bin/python3.10; do
    [ -x "$cand" ] && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 10)' >/dev/null 2>&1 && { echo "$cand"; return 0; }
  done
  return 1
}

# Bump LAYOUT when the way an environment is built changes (not for lock edits: the lock is hashed).
LAYOUT=1
hash="$( { echo "layout=$LAYOUT"; cat "$lock"; } | sha256sum | cut -c1-12)"
env_root="${PRIVTRAIN_ENV_ROOT:-$HOME/.cache/privtrain/envs}"
env_dir="$env_root/$name-$hash"
if [ -f "$env_dir/.complete" ]; then echo "$env_dir"; exit 0; fi

mkdir -p "$env_root"
exec 9>"$env_root/.$name.lock"
flock 9   # another set-up of the same environment may be running: wait for it
if [ -f "$env_dir/.complete" ]; then echo "$env_dir"; exit 0; fi

py="$(find_python310)" || {
  echo "setup_env: privtrain needs Python 3.10 (TFX 1.15 and tf-encrypted 0.9.1 do not support 3.11+)." >&2
  echo "  Install it (e.g. 'pyenv install 3.10.13' or 'apt-get install python3.10') or set PRIVTRAIN_PYTHON=/path/to/python3.10." >&2
  exit 3; }
echo "setup_env: creating the $name environment in $env_dir with $py (a few minutes, once)" >&2
rm -rf "$env_dir"
"$py" -m venv "$env_dir"
log="$env_root/$name-$hash.install.log"
pip_install() {
  "$env_dir/bin/python" -m pip install --no-input --no-deps "$@" >>"$log" 2>&1 || {
    echo "setup_env: pip install $* failed; the last lines of $log:" >&2; tail -n 30 "$log" >&2; exit 4; }
}
: >"$log"
pip_install 'pip==24.2'
pip_install -r "$lock"
# apache-beam and TFDV import pkg_resources, removed from setuptools >= 70.
pip_install 'setuptools==69.5.1'
touch "$env_dir/.complete"
echo "setup_env: $name environment ready" >&2
echo "$env_dir"
