#!/usr/bin/env bash
# Set up (if needed) and run the main job: segment the bundled nuclei sample with the shipped
# default weights and write the mask to ./demo_output; with a display, open napari with the
# plugin docked and the result shown.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/napari-medseg demo "$@"
