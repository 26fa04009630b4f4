#!/usr/bin/env bash
# Set up most_lightning on a fresh Debian/Ubuntu machine: system packages, then the Python package.
#   bash setup.sh          runtime dependencies (enough for `python run.py`)
#   bash setup.sh --dev    plus the test/benchmark dependencies (pytest, transformers, jiwer)
# Installs into the active Python environment (activate a virtualenv first if you want one).
set -euo pipefail
cd "$(dirname "$0")"

# flite speaks the demo corpus; wordnet-base provides its English sentences (WordNet example sentences).
APT_PACKAGES=(flite wordnet-base)
missing=()
command -v flite >/dev/null 2>&1 || missing+=(flite)
[ -f /usr/share/wordnet/data.noun ] || missing+=(wordnet-base)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing system packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "setup: missing system packages: ${missing[*]}" >&2
        echo "setup: install them as root, then run this script again:  sudo apt-get install -y ${APT_PACKAGES[*]}" >&2
        exit 1
    fi
fi

PYTHON=${PYTHON:-python3}
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"
echo "setup: pip install -e .${extra}"
"$PYTHON" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -e ".${extra}"
if [ -n "$extra" ]; then
    # DeepSpeed compiles two C++ ops on first use (shared-memory comm ~85 s, CPU Adam ~2 min on 2 cores): build them
    # once here, cached under ~/.cache/torch_extensions, so the distributed tests do not pay for it
    echo "setup: building DeepSpeed's CPU ops (once; cached in ~/.cache/torch_extensions)"
    "$PYTHON" -c "from deepspeed.accelerator import get_accelerator as acc
for name in ('ShareMemCommBuilder', 'CPUAdamBuilder'):
    builder = acc().create_op_builder(name)
    builder and builder.load()" >/dev/null 2>&1 \
        || echo "setup: warning: could not build DeepSpeed's CPU ops now (a C++ compiler is needed); they build on first use" >&2
fi
echo "setup: done"
