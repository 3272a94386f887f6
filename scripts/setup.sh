#!/usr/bin/env bash
# Installs the tested stack of fourm-eval into a virtual environment.
#
#   scripts/setup.sh            # creates/updates ./.venv
#
# Environment knobs:
#   VENV                   where the environment goes (default .venv)
#   PYTHON                 interpreter to build it from (default python3.11)
#   FOURM_EVAL_WHEELHOUSE  folder of prebuilt mmcv-2.1.0 wheels (a cluster's shared
#                          wheelhouse): WHEELHOUSE/<key>/mmcv-*.whl, key as below;
#                          a flat WHEELHOUSE/mmcv-*.whl is used for CPU-only ops only
#   FOURM_EVAL_CACHE       where a locally built mmcv wheel is kept, under its key,
#                          so each build happens once (default ~/.cache/fourm-eval)
#   TORCH_CUDA_ARCH_LIST   GPU architectures for mmcv's CUDA kernels (default: the
#                          visible GPUs'; needed on a login node without GPUs)
#   CUDA_HOME              the CUDA toolkit (default: nvcc on PATH); its major version
#                          must be torch's CUDA's
#   MAX_JOBS               parallel compile jobs for mmcv (default: nproc)
#
# The mmcv wheel's key (fourm_eval/wheelkey.py) holds everything that makes a build
# incompatible: torch version, CUDA version or cpu, the architecture list, the Python
# ABI, e.g. torch-2.14.1/cu12.8-sm80+sm90/cp311; a cached wheel is reused on an exact
# match only.
#
# Idempotent: every step checks whether it is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
CACHE_ROOT=${FOURM_EVAL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fourm-eval}
WHEELHOUSE=${FOURM_EVAL_WHEELHOUSE:-}
TORCH_VERSION=$(sed -n 's/^torch==//p' requirements/stack.txt)
TORCHVISION_VERSION=$(sed -n 's/^torchvision==//p' requirements/stack.txt)
MMCV_VERSION=$(sed -n 's/^mmcv==//p' requirements/stack.txt)
MMDET_VERSION=$(sed -n 's/^mmdet==//p' requirements/stack.txt)
MMSEG_VERSION=$(sed -n 's/^mmsegmentation==//p' requirements/stack.txt)
MMCV_CACHE="$CACHE_ROOT/wheels"

# Quiet by default: one line per step with its time; the full output of pip, apt and the
# compiler goes to a log file under the cache, whose path is printed when a step fails.
mkdir -p "$CACHE_ROOT/logs"
LOG="$CACHE_ROOT/logs/setup-$(date +%Y%m%d-%H%M%S).log"
: > "$LOG"
die() { printf 'setup failed: %s\n  full log: %s\n' "$*" "$LOG" >&2; exit 1; }
# run_step "what" cmd...: runs cmd with its output in the log; prints "what ... done (12 s)"
run_step() {
  local what=$1; shift
  local t0=$SECONDS
  printf '%s ... ' "$what"
  printf '\n==> %s\n$ %s\n' "$what" "$*" >> "$LOG"
  if "$@" >> "$LOG" 2>&1; then
    printf 'done (%d s)\n' $((SECONDS - t0))
  else
    printf 'FAILED (%d s)\n' $((SECONDS - t0))
    tail -n 25 "$LOG" | sed 's/^/  | /' >&2
    die "$what"
  fi
}

command -v "$PYTHON" >/dev/null || die "$PYTHON not found; fourm-eval needs Python 3.11 (set PYTHON=...)"
if [ ! -x "$VENV/bin/python" ]; then
  run_step "creating virtual environment $VENV" "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

has() { "$PY" - "$@" >/dev/null 2>&1; }

if ! has <<PYEOF
import torch, torchvision
assert torch.__version__.split("+")[0] == "$TORCH_VERSION", torch.__version__
assert torchvision.__version__.split("+")[0] == "$TORCHVISION_VERSION"
PYEOF
then
  run_step "installing torch $TORCH_VERSION and torchvision $TORCHVISION_VERSION" \
    "${PIP[@]}" install "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi

# what mmcv build this machine needs (CPU-only, or CUDA x.y for sm_..), and its cache key
plan_out=$("$PY" fourm_eval/wheelkey.py plan 2>"$LOG.plan") || { cat "$LOG.plan" >&2; die "cannot plan the mmcv build (above)"; }
eval "$plan_out"
cat "$LOG.plan" >&2; rm -f "$LOG.plan"
echo "mmcv build for this machine: $MMCV_WORDS (key $MMCV_KEY)"

mmcv_ok() {
  [ "$(cat "$VENV/.mmcv-build-key" 2>/dev/null)" = "$MMCV_KEY" ] || return 1
  has <<PYEOF
import mmcv
assert mmcv.__version__ == "$MMCV_VERSION", mmcv.__version__
from mmcv.utils import ext_loader
ext_loader.load_ext("_ext", ["nms", "roi_align_forward"])
PYEOF
}

install_mmcv_wheel() {
  run_step "installing mmcv $MMCV_VERSION from $1" "${PIP[@]}" install --no-deps --force-reinstall "$1"
  # mmcv's runtime dependencies, minus opencv-python (the headless build avoids GUI libs)
  run_step "installing mmcv's dependencies" "${PIP[@]}" install addict packaging Pillow pyyaml yapf \
    opencv-python-headless "mmengine==$(sed -n 's/^mmengine==//p' requirements/stack.txt)"
}

# mmcv is compiled in a throw-away build environment, never in the project's venv: its setup.py
# needs setuptools<70 (pkg_resources), which would put the venv in conflict with torch's
# setuptools requirement. The build environment sees the project's torch through a .pth file.
build_mmcv() {
  local build=$1
  local benv="$build/buildenv"
  "$PYTHON" -m venv "$benv" || return 1
  local site bsite
  site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || return 1
  bsite=$("$benv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || return 1
  echo "$site" > "$bsite/zz-project-venv.pth"  # after the build env's own packages: its setuptools wins
  "$benv/bin/python" -m pip --disable-pip-version-check install "setuptools<70" wheel ninja || return 1
  "$benv/bin/python" -c 'import torch, pkg_resources, ninja' || return 1
  "$benv/bin/python" -m pip --disable-pip-version-check download --no-deps --no-binary :all: \
    --no-build-isolation "mmcv==$MMCV_VERSION" -d "$build" || return 1
  tar -xzf "$build"/mmcv-"$MMCV_VERSION".tar.gz -C "$build" || return 1
  local src="$build/mmcv-$MMCV_VERSION"
  # torch >= 2.14 headers need C++20; mmcv 2.1.0 hard-codes C++17.
  sed -i 's/-std=c++17/-std=c++20/g' "$src/setup.py"
  # shellcheck disable=SC2086  # MMCV_BUILD_ENV: KEY=VALUE words from wheelkey.py
  env PATH="$benv/bin:$PATH" $MMCV_BUILD_ENV MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    "$benv/bin/python" -m pip --disable-pip-version-check wheel --no-deps --no-build-isolation \
    -w "$build/dist" "$src"
}

if ! mmcv_ok; then
  wheel=""
  for dir in "$WHEELHOUSE" "$MMCV_CACHE"; do
    [ -n "$dir" ] && [ -d "$dir" ] || continue
    cand=$("$PY" fourm_eval/wheelkey.py pick "$dir" "mmcv-$MMCV_VERSION-*.whl" 2>/dev/null || true)
    if [ -n "$cand" ]; then wheel=$cand; break; fi
  done
  if [ -n "$wheel" ]; then
    install_mmcv_wheel "$wheel"
    echo "$MMCV_KEY" > "$VENV/.mmcv-build-key"
    mmcv_ok || die "the mmcv wheel $wheel (for $MMCV_KEY) does not load its compiled ops with torch $TORCH_VERSION; remove it (or unset FOURM_EVAL_WHEELHOUSE) to build from source"
  else
    build=$(mktemp -d)
    trap 'rm -rf "$build"' EXIT
    keyed="$MMCV_CACHE/$MMCV_KEY"
    mkdir -p "$keyed"
    run_step "building mmcv $MMCV_VERSION with $MMCV_WORDS in a throw-away build environment (CPU-only: 11-16 min on 2 cores; once per key, cached in $keyed)" \
      build_mmcv "$build"
    built=$(ls "$build"/dist/mmcv-"$MMCV_VERSION"-*.whl)
    # write the cache atomically so an interrupted build never leaves a broken wheel; BUILD.json names its key
    cp "$built" "$keyed/.partial.whl" && mv "$keyed/.partial.whl" "$keyed/$(basename "$built")"
    "$PY" fourm_eval/wheelkey.py label "$keyed" >/dev/null
    install_mmcv_wheel "$keyed/$(basename "$built")"
    echo "$MMCV_KEY" > "$VENV/.mmcv-build-key"
    mmcv_ok || die "mmcv $MMCV_VERSION was built ($MMCV_WORDS) but its ops do not load; see the build log above"
  fi
fi

if ! has <<PYEOF
import importlib.metadata as m
assert m.version("mmdet") == "$MMDET_VERSION"
assert m.version("mmsegmentation") == "$MMSEG_VERSION"
PYEOF
then
  run_step "installing mmdet $MMDET_VERSION and mmsegmentation $MMSEG_VERSION (no-deps, see docs/stack.md)" \
    "${PIP[@]}" install --no-deps "mmdet==$MMDET_VERSION" "mmsegmentation==$MMSEG_VERSION"
fi

# The report test opens report.html in a real headless browser (Debian's chromium).
if ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    run_step "installing chromium (headless browser for the report test)" \
      sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium'
  else
    printf '\nwarning: chromium is not installed and cannot be installed here (needs apt-get as root);\n'
    printf 'the report-in-a-browser test will fail until it is (apt-get install chromium).\n'
  fi
fi

run_step "installing fourm-eval and its Python dependencies" "${PIP[@]}" install -e ".[test,loggers]"
run_step "checking that installed packages agree (pip check)" "${PIP[@]}" check

"$VENV/bin/fourm-eval" doctor --brief || die "the stack is installed but 'fourm-eval doctor' reports a problem (above)"
echo "setup complete: $VENV (log: $LOG)"
