#!/usr/bin/env bash
# The main job: set-up (idempotent), then the default benchmark suite (CPU, no download).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/psiopt bench "$@"
