"""`python -m stereo bench-data` prints a readable table (ours vs the plain cv2 loader) and writes JSON on request."""

from __future__ import annotations

import json
from pathlib import Path

from stereo.cli import main


def test_bench_data_prints_a_table_and_writes_json(tmp_path: Path, capsys):
    out = tmp_path / "figures.json"
    assert main(["bench-data", "--samples", "2", "--repeats", "1", "--workers", "", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("data loading, one core (CPU time): FSD-like 1280x720 samples")
    assert "ours       read" in printed and "plain_cv2" in printed and "ours / plain" in printed
    assert not printed.lstrip().startswith("{")
    figures = json.loads(out.read_text())
    assert figures["sample"]["size"] == [720, 1280] and 250 < figures["sample"]["disparity_kb"] < 700
    assert figures["per_core"]["ours"]["samples_per_s"] > 0 and figures["speedup_vs_plain"] > 0
