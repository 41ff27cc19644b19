"""Open the report in headless Chromium, offline: no JavaScript error, no empty plot, the table sorts.

Skipped (with a message) when Chromium is not installed, except in CI (``CI=true``), where a
missing browser fails the test: .ci/run installs Debian's ``chromium``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kdsearch.report import build_report

from helpers_study import FixtureStudy

pytestmark = pytest.mark.browser

# Installed before any other script of the page: records errors and rejected promises.
_PROBE_HEAD = """<script>window.__errors=[];
window.onerror=function(m,src,line,col){window.__errors.push(String(m)+' @'+line+':'+col);};
window.addEventListener('unhandledrejection',function(e){window.__errors.push('rejection: '+String(e.reason));});
</script>"""
# After load: count drawn plots, click a header twice, write the findings into the DOM.
_PROBE_TAIL = """<script>window.addEventListener('load',function(){setTimeout(function(){
var out={errors:window.__errors,plots:0,drawn:[],empty:[]};
document.querySelectorAll('.js-plotly-plot').forEach(function(p){out.plots++;
  var svg=p.querySelector('.main-svg');
  var ok=svg&&svg.childElementCount>0&&p.data&&p.data.length>0&&p.getBoundingClientRect().height>100;
  (ok?out.drawn:out.empty).push(p.id);});
function order(){return Array.prototype.map.call(document.querySelectorAll('#pareto-table tbody tr'),
  function(r){return Number(r.getAttribute('data-trial'));});}
var th=document.querySelector("#pareto-table th[data-metric='val_accuracy']");
out.initial=order(); th.click(); out.asc=order(); th.click(); out.desc=order();
var lat=document.querySelector("#pareto-table th[data-metric='latency_ms_b1']"); lat.click(); out.lat=order();
var pre=document.createElement('pre');pre.id='kd-probe';pre.textContent=JSON.stringify(out);
document.body.appendChild(pre);},300);});</script>"""


def _chromium() -> str | None:
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_report_renders_in_headless_chromium(fixture_study: FixtureStudy, tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("chromium is not installed but CI=true: .ci/run must install it (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium); the browser check did not run")
    report = build_report(fixture_study.storage_url, fixture_study.study_name, tmp_path / "report.html",
                          artifact_dir=fixture_study.artifact_dir)
    page = report.read_text(encoding="utf-8")
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("<head>", "<head>" + _PROBE_HEAD, 1).replace("</body>", _PROBE_TAIL + "</body>", 1))
    cmd = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
        f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000", "--window-size=1280,2000",
        "--dump-dom", probed.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="kd-probe">(.*?)</pre>', proc.stdout, re.S)
    assert m, f"the probe did not report (exit {proc.returncode}); stderr tail: {proc.stderr[-2000:]}"
    import html

    out = json.loads(html.unescape(m.group(1)))
    assert out["errors"] == []
    summary = json.loads(re.search(r"id='kdsearch-report-data'>(.*?)</script>", page).group(1))
    assert out["plots"] == len(summary["figures"]) == 6
    assert out["empty"] == [] and sorted(out["drawn"]) == sorted(summary["figures"])
    assert out["initial"] == [0, 1, 4, 7]
    assert out["asc"] == [0, 1, 4, 7]  # accuracy 0.41 < 0.62 < 0.70 < 0.74
    assert out["desc"] == [7, 4, 1, 0]
    assert out["lat"] == [0, 1, 4, 7]  # latency 0.5 < 1.2 < 1.8 < 1.95
