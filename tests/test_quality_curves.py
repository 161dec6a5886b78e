"""``benchmarks/quality_curves.py``: the FID-against-minutes chart and table built from quality results, every
checkpoint of every selected run drawn where its minute and FID say, and a missing run named in one line."""

from __future__ import annotations

import json
import runpy
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
curves = runpy.run_path(str(REPO / "benchmarks" / "quality_curves.py"), run_name="quality_curves")


def _row(method, stage, step, minute, fid, held):
    return {"method": method, "stage": stage, "step": step, "minute": minute, "fid": fid, "fid_held_out": held}


def test_every_checkpoint_of_the_selected_runs_is_drawn_and_tabled(tmp_path):
    short = [_row("hdebm", "stage1", 300, 4.0, 40.0, 50.0), _row("hdebm", "stage1", 600, 8.0, 20.0, 25.0),
             _row("mjem", "mjem", 1000, 3.0, 30.0, 35.0), _row("mjem", "mjem", 2000, 6.0, 10.0, 20.0)]  # fmt: skip
    long = [_row("mjem", "mjem", 5000, 16.0, 5.0, 15.0)]
    (tmp_path / "quality_short.json").write_text(json.dumps({"checkpoints": short}))
    (tmp_path / "quality_long.json").write_text(json.dumps({"checkpoints": long}))
    assert curves["main"](["short:hdebm", "long", "--name", "c", "--results", str(tmp_path)]) == 0
    root = ET.parse(tmp_path / "quality_c.svg").getroot()
    lines = [e for e in root.iter() if e.tag.endswith("polyline")]
    dots = [e for e in root.iter() if e.tag.endswith("circle")]
    # two panels x (short's hdebm stage1 + long's mjem); short's mjem rows were not selected
    assert len(lines) == 4 and len(dots) == 2 * 3
    hdebm = [e for e in lines if e.attrib["stroke"] == curves["COLOURS"][("hdebm", "stage1")]]
    (x1, y1), (x2, y2) = (map(float, p.split(",")) for p in hdebm[0].attrib["points"].split())
    assert x2 > x1  # the later minute to the right
    assert y2 > y1  # the lower FID drawn lower (SVG y grows downward; the axis grows upward)
    table = (tmp_path / "quality_c.md").read_text()
    assert "| short | hdebm | stage1 | 600 | 8.0 | 20.00 | 25.00 |" in table and "| long | mjem |" in table
    assert "| short | mjem |" not in table
    with pytest.raises(SystemExit, match="no results .*quality_nope.json"):
        curves["main"](["nope", "--results", str(tmp_path)])
