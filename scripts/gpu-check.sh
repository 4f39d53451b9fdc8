#!/usr/bin/env bash
# Everything in psiopt that needs a GPU, in one command, within 8 minutes on one H100:
#   1. the CUDA tests (pytest -m cuda): the Triton kernels of PSISGD, PSIAdam and PSIAdaSGD
#      against the reference loops, PSISGD's synchronization promises, CUDA against CPU;
#   2. host synchronizations of one step of PSISGD (capturable or not) and PSIAdamW, under
#      torch.cuda.set_sync_debug_mode (scripts/gpu_syncs.py);
#   3. psiopt bench --suite gpu-check --device cuda: the step-time curve against torch's
#      fused optimizers, step time on a ResNet-18, a short training run on shipped data.
# It writes benchmarks/results/gpu-<date>-<device>/ (or --out DIR): results.json, report.md
# and plots (the bench), tests.log, syncs.json, environment.txt (nvidia-smi, versions) and
# gpu-check.log (this script's output). Each part has a time limit within the 8 minutes;
# every part runs even if one fails, and the exit status is nonzero if any failed. Without a
# CUDA GPU it stops at once, with status 1 and a message saying so.
#
# Set-up: no network is needed. The Python is $PYTHON, else .venv/bin/python, else python3:
# the first whose torch sees a CUDA device (this project's .venv holds a CPU torch, so on a
# GPU machine it is the system's). psiopt runs from this checkout. Python packages missing
# there are installed (into a temporary folder) from the wheels in .whl/, which
# scripts/gpu-wheels.sh downloads where there is a network: on a bare CUDA image with torch,
# triton, numba and pytest, that is geoopt and mlxtend.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
BUDGET=${GPU_CHECK_BUDGET_S:-430}  # set-up and parts; each part may overrun its limit by 15 s (SIGINT, then SIGKILL): 8 minutes at worst

out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out=${2:?--out needs a directory}; shift 2 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "gpu-check: unknown argument $1 (usage: scripts/gpu-check.sh [--out DIR])" >&2; exit 2 ;;
    esac
done

# -- a Python whose torch sees a GPU, or a loud stop ---------------------------------------
tried=()
PY=""
for candidate in "${PYTHON:-}" .venv/bin/python python3; do
    [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 || continue
    [[ "$candidate" == */* ]] && candidate="$(cd "$(dirname "$candidate")" && pwd)/$(basename "$candidate")"
    case " ${tried[*]:-} " in *" $candidate:"*) continue ;; esac  # each Python once
    answer=$("$candidate" -c 'import torch; print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda}), torch.cuda.is_available() = {torch.cuda.is_available()}")' 2>/dev/null) \
        || answer="no torch"
    tried+=("$candidate: $answer")
    if [ "${answer##* }" = "True" ]; then
        PY=$candidate
        break
    fi
done
if [ -z "$PY" ]; then
    {
        echo "gpu-check: no CUDA GPU here, so nothing was measured."
        if command -v nvidia-smi >/dev/null 2>&1; then
            echo "  nvidia-smi: $(nvidia-smi -L 2>&1 | head -n 3)"
        else
            echo "  nvidia-smi: not found (no NVIDIA driver)"
        fi
        printf '  %s\n' "${tried[@]:-no Python found}"
        echo "  Run this on a machine with an NVIDIA GPU and a CUDA build of torch (PYTHON=... names its Python)."
    } >&2
    exit 1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

need=(torch triton numpy scipy numba geoopt pytest mlxtend matplotlib)
missing() { "$PY" -c 'import importlib.util, sys; print(" ".join(n for n in sys.argv[1:] if importlib.util.find_spec(n) is None))' "${need[@]}"; }
lacking=$(missing)
wheels=()
for name in $lacking; do  # only what is missing: a carried wheel never shadows an installed package
    for wheel in .whl/"$name"-*.whl; do [ -f "$wheel" ] && wheels+=("$wheel"); done
done
if [ "${#wheels[@]}" -gt 0 ]; then
    site=$(mktemp -d)/site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$site" "${wheels[@]}" \
        && export PYTHONPATH="$PYTHONPATH:$site"
    lacking=$(missing)
fi
if [ -n "$lacking" ]; then
    echo "gpu-check: $PY lacks the Python packages: $lacking. Carry their wheels in .whl/ (scripts/gpu-wheels.sh downloads geoopt's and mlxtend's) or install them." >&2
    exit 1
fi

device=$("$PY" -c 'import torch; print(torch.cuda.get_device_name())')
slug=$(echo "$device" | tr '[:upper:]' '[:lower:]' | sed 's/[^a-z0-9]\{1,\}/-/g; s/^-//; s/-$//')
out=${out:-benchmarks/results/gpu-$(date -u +%Y-%m-%d)-$slug}
mkdir -p "$out" || exit 1
exec > >(tee "$out/gpu-check.log") 2>&1
echo "gpu-check: $device, $PY, results in $out"

{
    echo "# date (UTC): $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "# git commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "# nvidia-smi"
    nvidia-smi 2>&1
    echo "# versions"
    "$PY" - <<'EOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), platform.machine())
print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version())
props = torch.cuda.get_device_properties(0)
print("device", props.name, f"{props.total_memory / 2**30:.1f} GiB", f"sm_{props.major}{props.minor}", props.multi_processor_count, "SMs")
for name in ("psiopt", "triton", "numba", "numpy", "scipy", "geoopt", "pytest", "mlxtend", "matplotlib"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "(from this checkout)" if name == "psiopt" else "not installed")
EOF
} > "$out/environment.txt" 2>&1

failed=()
# Runs one part with its time limit, cut to what is left of the budget. SIGINT: the bench keeps
# every run it finished (results.json marks it interrupted), pytest prints what it ran.
part() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -le 10 ]; then
        echo "== $name: skipped, the time budget is spent"
        failed+=("$name (not run: no time left)")
        return
    fi
    echo "== $name (at most ${limit} s)"
    local t0=$SECONDS
    timeout -s INT -k 15 "$limit" "$@"
    local rc=$?
    echo "== $name: exit status $rc after $((SECONDS - t0)) s"
    if [ "$rc" -ne 0 ]; then
        failed+=("$name (exit status $rc$([ "$rc" -eq 124 ] && echo ', timed out'))")
    fi
}

mapfile -t cuda_tests < <(grep -l "pytest.mark.cuda" tests/test_*.py)
# Most of the CUDA tests' time is Triton compiling (about 120 kernels): 4 processes where
# pytest-xdist is installed (it is on the CUDA image) compile 4 at a time.
parallel=()
"$PY" -c 'import xdist' 2>/dev/null && parallel=(-n 4)
part "CUDA tests" 210 bash -c 'set -o pipefail; "$0" -m pytest -m cuda -p no:cacheprovider -q -rfEs "${@:2}" 2>&1 | tee "$1"' \
    "$PY" "$out/tests.log" "${parallel[@]}" "${cuda_tests[@]}"
part "host synchronizations" 60 "$PY" scripts/gpu_syncs.py --out "$out/syncs.json"
part "bench (gpu-check suite)" 240 "$PY" -m psiopt.cli bench --suite gpu-check --device cuda --no-progress --out "$out"

echo "gpu-check: $((SECONDS - START)) s in all; results in $out"
if [ "${#failed[@]}" -gt 0 ]; then
    printf 'gpu-check: FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "gpu-check: every part passed"
