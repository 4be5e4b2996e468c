#!/usr/bin/env bash
# System packages the tests, the image data set and the encrypted service need: dataset-fashion-mnist (the
# Fashion-MNIST IDX files), iproute2 (`ip netns`: the encrypted service runs
# its TF cluster in a private network namespace) and chromium (headless: the audit-report test renders the
# HTML report and checks its screenshot). Installed with apt-get when missing and running as root;
# otherwise says what is missing (the encrypted-service tests then skip, the CLI explains the fix).
set -euo pipefail
missing=()
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
# Fashion-MNIST's IDX files (data/fashion_mnist/dataset.json points at /usr/share/datasets/fashion-mnist).
[ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup_system: installing ${missing[*]}" >&2
  # A registry hiccup must not fail the whole set-up: the tests that need these packages then skip with a message.
  { DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; } ||
    echo "setup_system: could not install ${missing[*]}; the tests that need them will skip" >&2
else
  echo "setup_system: missing ${missing[*]} (install as root: apt-get install ${missing[*]})" >&2
fi
