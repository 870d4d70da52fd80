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


def _results_table_script():
    from script_modules import load_script

    return load_script("results_table")


FAKE_CARDS = [
    {"tag": "net_a", "network": "sa2net", "variant": "lite", "dataset": "dsb2018",
     "task": "instances", "settings": {"steps": 10, "wall_time_min": 2, "device": "cpu"},
     "metrics": {"dice": 0.9, "iou": 0.8, "hd95": 4.56, "f1_iou50": 0.75, "ap_iou50": 0.6,
                 "dsb_score": 0.4321, "aji": 0.55, "n_images": 3,
                 "by_type": {"fluorescence": {"n_images": 2, "dice": 0.95, "f1_iou50": 0.8,
                                              "ap_iou50": 0.7, "dsb_score": 0.5, "aji": 0.6},
                             "H&E": {"n_images": 1, "dice": 0.8, "f1_iou50": 0.65,
                                     "ap_iou50": 0.5, "dsb_score": 0.3, "aji": 0.45}}}},
    {"tag": "net_b", "network": "unet_sharp", "variant": "lite", "dataset": "ph2",
     "task": "mask", "settings": {}, "metrics": {"dice": 0.85}},
]


def test_results_tables_of_fake_cards():
    script = _results_table_script()
    lines = script.table(FAKE_CARDS).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[5:12] == ["Dice", "IoU", "HD95 (px)", "F1@0.5", "AP@0.5", "DSB score", "AJI"]
    a = [c.strip() for c in lines[2].strip("|").split("|")]
    b = [c.strip() for c in lines[3].strip("|").split("|")]
    assert len(a) == len(b) == len(header) == lines[1].count("---")
    assert a[5:12] == ["0.900", "0.800", "4.6", "0.750", "0.600", "0.432", "0.550"]
    assert b[5:12] == ["0.850"] + ["-"] * 6  # metrics a card lacks
    kinds = script.by_type_table(FAKE_CARDS).splitlines()
    assert "acquisition type" in kinds[0]
    assert kinds[4:] == [  # sorted by type; the card without by_type has no row
        "| `net_a` | H&E | 1 | 0.800 | 0.650 | 0.500 | 0.300 | 0.450 |",
        "| `net_a` | fluorescence | 2 | 0.950 | 0.800 | 0.700 | 0.500 | 0.600 |",
    ]
    assert "no card has" in script.by_type_table(FAKE_CARDS[1:])


def test_results_tables_render_into_the_markers():
    script = _results_table_script()
    text = f"intro\n{script.BEGIN}\nold\n{script.END}\noutro\n"
    new = script.render(text, FAKE_CARDS)
    assert new.index(script.END) < new.index(script.TYPES_BEGIN) < new.index("outro")
    assert script.table(FAKE_CARDS) in new and script.by_type_table(FAKE_CARDS) in new
    assert script.render(new, FAKE_CARDS) == new  # up to date: --check passes
    assert script.render(new, FAKE_CARDS[1:]) != new  # a changed card: --check fails
