#!/usr/bin/env bash
# Creates .venv (once) and installs psiopt with its test, benchmark and docs extras.
# torch is pinned to the local CPU build through constraints.txt, so no CUDA wheel is
# ever downloaded here; users installing psiopt elsewhere keep their own torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.psiopt-setup
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt "torch==2.13.0"
    .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test,bench,docs]"
    echo "$want" > "$stamp"
fi
