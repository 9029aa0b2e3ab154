"""The dashboard is one self-contained HTML file with the expected feature rows, escaped tokens and scores."""
from __future__ import annotations

import base64
import re

import numpy as np
import pytest

from fast_sae.evaluate.interpret.dashboard import write_dashboard

REPORTS = [
    {"feature": 3, "density": 0.01, "max_act": 7.5, "mean_act": 0.1, "contexts": [
        {"sequence": 0, "token_index": 1, "position": 1, "max_act": 7.5, "peak": 1, "token_ids": [1, 2, 3],
         "tokens": ["<|im_start|>", "<script>alert(1)</script>", "a & b\n"], "acts": [0.0, 7.5, 1.0],
         "copies": 40, "in_shared_prefix": True},
        {"sequence": 5, "token_index": 90, "position": 7, "max_act": 3.0, "peak": 0, "token_ids": [4],
         "tokens": ["x"], "acts": [3.0], "copies": 1, "in_shared_prefix": False}]},
    {"feature": 11, "density": 0.2, "max_act": 2.0, "mean_act": 0.3, "contexts": []},
]


@pytest.mark.slow
def test_dashboard_written_self_contained_and_escaped(tmp_path):
    judged = [{"feature": 3, "score": 4, "name": "tags <b>"},
              {"feature": 11, "score": None, "reason": "malformed reply"}]
    path = write_dashboard(tmp_path / "d" / "dashboard.html", title="SAE <x>", reports=REPORTS,
                           density=np.array([0.0, 0.01, 0.2, 1e-4]), judged=judged, summary={"layer": 2},
                           selection_rule="one per sequence <rule>")
    html = path.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert [int(k) for k in re.findall(r'data-feature="(\d+)"', html)] == [3, 11]
    assert "&lt;|im_start|&gt;" in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "a &amp; b\u21b5" in html
    assert "<script" not in html.replace("&lt;script", "")  # no script at all, escaped or not ours
    assert not re.search(r'(src|href)="(https?:)?//', html)  # nothing external
    assert "<style>" in html and "SAE &lt;x&gt;" in html
    assert "4/5" in html and "tags &lt;b&gt;" in html and "unscored (malformed reply)" in html
    assert "no positive activation" in html  # feature 11 has no contexts
    png = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html).group(1)
    assert base64.b64decode(png)[:8] == b"\x89PNG\r\n\x1a\n"
    assert '<a href="#f3">3</a>' in html and '<a href="#f11">11</a>' in html  # the index links to each block
    assert 'class="tok peak"' in html and "rgba(230,60,30,1.00)" in html  # the peak token is fully highlighted
    # the page says how examples were chosen, and marks a repeated template-prefix example (only that one)
    assert "Top examples: one per sequence &lt;rule&gt;." in html
    assert html.count("&times;40 copies") == 1 and html.count("shared template prefix (not a ★ token)") == 1
    assert html.count('class="mark"') == 2
