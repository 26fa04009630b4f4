#!/usr/bin/env bash
# Set up most_lightning on a fresh Debian/Ubuntu machine: system packages, a Python environment, the package.
#   bash setup.sh && .venv/bin/python run.py                the main job
#   bash setup.sh --dev && .venv/bin/python -m pytest       the tests (adds pytest, transformers, jiwer)
# Python environment: the active virtual environment (VIRTUAL_ENV, or CONDA_PREFIX) when there is one, else the
# project's own .venv, created here (stock Debian/Ubuntu Pythons are "externally managed": pip refuses them).
# With an active environment, .venv is made a link to it, so `.venv/bin/python` is the interpreter either way.
#   PYTHON=python3.12 bash setup.sh     build .venv from another interpreter (needs Python >= 3.11)
#   bash setup.sh --no-venv             install into the `python3` on PATH as it is (a container or pyenv Python)
set -euo pipefail
cd "$(dirname "$0")"

DEV=0
USE_VENV=1
for arg in "$@"; do
    case "$arg" in
        --dev) DEV=1 ;;
        --no-venv) USE_VENV=0 ;;
        -h | --help) sed -n '2,9p' "$0"; exit 0 ;;
        *) echo "setup: unknown argument '$arg' (allowed: --dev, --no-venv, --help)" >&2; exit 2 ;;
    esac
done

# ---- which Python environment ----------------------------------------------------------------------------------
ACTIVE_ENV="${VIRTUAL_ENV:-${CONDA_PREFIX:-}}"
BASE_PYTHON="${PYTHON:-python3}"
if ! command -v "$BASE_PYTHON" >/dev/null 2>&1; then
    echo "setup: no '$BASE_PYTHON' command; install Python >= 3.11:  sudo apt-get install -y python3 python3-venv" >&2
    exit 1
fi
py_version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])'; }
if ! "$BASE_PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "setup: $BASE_PYTHON is Python $(py_version "$BASE_PYTHON"); most_lightning needs Python >= 3.11." >&2
    echo "setup: install one (e.g. sudo apt-get install -y python3.11 python3.11-venv), then run:" \
         " PYTHON=python3.11 bash setup.sh" >&2
    exit 1
fi
NEED_VENV=0  # create .venv below (none yet, or one left without pip by an earlier failed try)
if [ "$USE_VENV" -eq 1 ] && [ -z "$ACTIVE_ENV" ] \
        && ! { [ -x .venv/bin/python ] && .venv/bin/python -m pip --version >/dev/null 2>&1; }; then
    NEED_VENV=1
fi

# ---- system packages -------------------------------------------------------------------------------------------
# flite speaks the demo corpus; wordnet-base provides its English sentences (WordNet example sentences);
# python3-venv (Debian/Ubuntu split venv's pip bootstrap out of python3) creates .venv.
missing=()
command -v flite >/dev/null 2>&1 || missing+=(flite)
[ -f /usr/share/wordnet/data.noun ] || missing+=(wordnet-base)
if [ "$NEED_VENV" -eq 1 ] && ! "$BASE_PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    version="$(py_version "$BASE_PYTHON")"
    if [ -x /usr/bin/python3 ] && [ "$(py_version /usr/bin/python3)" = "$version" ]; then
        missing+=(python3-venv)
    else
        missing+=("python${version}-venv")
    fi
fi
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing system packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "setup: missing system packages: ${missing[*]}" >&2
        echo "setup: install them as root, then run this script again:  sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
fi

# ---- the environment's interpreter: every pip/python call below uses "$PY" ----------------------------------
if [ "$USE_VENV" -eq 0 ]; then
    PY="$(command -v "$BASE_PYTHON")"
elif [ -n "$ACTIVE_ENV" ]; then
    PY="$ACTIVE_ENV/bin/python"
    if [ ! -e .venv ] && [ ! -L .venv ]; then
        ln -s "$ACTIVE_ENV" .venv
        echo "setup: using the active environment $ACTIVE_ENV (.venv links to it)"
    elif [ "$(cd .venv && pwd -P)" != "$(cd "$ACTIVE_ENV" && pwd -P)" ]; then
        echo "setup: note: installing into the active environment $ACTIVE_ENV; .venv is another one" >&2
    fi
else
    if [ "$NEED_VENV" -eq 1 ]; then
        if [ -f .venv/pyvenv.cfg ]; then rm -rf .venv; fi
        echo "setup: creating .venv with $BASE_PYTHON (Python $(py_version "$BASE_PYTHON"))"
        "$BASE_PYTHON" -m venv .venv
    fi
    PY="$PWD/.venv/bin/python"
fi
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "setup: $PY is Python $(py_version "$PY"); most_lightning needs Python >= 3.11" >&2
    exit 1
fi
if ! "$PY" -m pip --version >/dev/null 2>&1; then
    echo "setup: $PY has no pip; recreate the environment (e.g. rm -rf .venv, then run this script again)" >&2
    exit 1
fi

extra=""
[ "$DEV" -eq 1 ] && extra="[dev]"
echo "setup: pip install -e .${extra} into $("$PY" -c 'import sys; print(sys.prefix)')"
"$PY" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -e ".${extra}"
if [ "$DEV" -eq 1 ]; then
    # DeepSpeed compiles two C++ ops on first use (shared-memory comm ~85 s, CPU Adam ~2 min on 2 cores): build them
    # once here, cached under ~/.cache/torch_extensions, so the distributed tests do not pay for it
    echo "setup: building DeepSpeed's CPU ops (once; cached in ~/.cache/torch_extensions)"
    "$PY" -c "from deepspeed.accelerator import get_accelerator as acc
for name in ('ShareMemCommBuilder', 'CPUAdamBuilder'):
    builder = acc().create_op_builder(name)
    builder and builder.load()" >/dev/null 2>&1 \
        || echo "setup: warning: could not build DeepSpeed's CPU ops now (a C++ compiler is needed); they build on first use" >&2
fi
echo "setup: done; run with $( [ "$USE_VENV" -eq 1 ] && echo .venv/bin/python || echo "$PY" )"
