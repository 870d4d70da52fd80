"""The README's claims that can be checked mechanically."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_first_lines_are_the_two_setup_commands():
    lines = [line for line in (ROOT / "README.md").read_text().splitlines() if line.strip()]
    block = lines[lines.index("```bash") + 1: lines.index("```bash") + 3]
    assert block[0].startswith("bash scripts/demo.sh")
    assert block[1].startswith("bash scripts/test.sh")
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_results_table_matches_model_cards():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "results_table.py"), "--check"])
    assert result.returncode == 0, "README results table is stale: run scripts/results_table.py"
