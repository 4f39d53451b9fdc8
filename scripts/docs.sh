#!/usr/bin/env bash
# Build the documentation site (strict) and open it locally.
#   bash scripts/docs.sh            build into site/ and serve it at http://127.0.0.1:8000/
#   bash scripts/docs.sh --build    build into site/ only
#   bash scripts/docs.sh --live     mkdocs serve: rebuild and reload while editing docs/
# PORT=8001 bash scripts/docs.sh picks another port.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export NO_MKDOCS_2_WARNING=1
port=${PORT:-8000}
case "${1:-}" in
    --live)
        exec .venv/bin/python -m mkdocs serve --strict --dev-addr "127.0.0.1:$port"
        ;;
    --build | "")
        .venv/bin/python -m mkdocs build --strict --site-dir site
        ;;
    *)
        echo "usage: bash scripts/docs.sh [--build | --live]" >&2
        exit 2
        ;;
esac
if [ "${1:-}" = "" ]; then
    echo "serving the docs at http://127.0.0.1:$port/ (Ctrl-C to stop)"
    exec .venv/bin/python -m http.server "$port" --bind 127.0.0.1 --directory site
fi
