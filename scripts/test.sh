#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite; GUI tests run under Xvfb (pytest-xvfb).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/lint-imports
exec .venv/bin/python -m pytest "$@"
