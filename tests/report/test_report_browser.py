"""Open the report in headless Chromium, offline: no JavaScript error, no empty plot, the table
sorts, the "At a glance" table is at the top and the teacher's reference line is drawn; a
screenshot of the page's top is kept as a test artifact (``tests/report/artifacts/report.png``,
git-ignored; its path is printed).

Skipped (with a message) when Chromium is not installed, except in CI (``CI=true``), where a
missing browser fails the test: .ci/run installs Debian's ``chromium``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from kdsearch.report import build_report

from study_helpers import FixtureStudy

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
var glance=document.getElementById('glance'), first=document.querySelector('h2');
out.glance_first=!!glance&&first&&first.parentElement===glance;
out.glance_roles=Array.prototype.map.call(document.querySelectorAll('#glance-table tbody tr'),
  function(r){return [r.cells[0].textContent, r.cells[1].textContent];});
out.glance_top=glance?glance.getBoundingClientRect().top:null;
out.ref_lines={};
['fig-acc-macs','fig-acc_latency'].forEach(function(id){var p=document.getElementById(id);
  out.ref_lines[id]=p?p.querySelectorAll('.shapelayer path').length:-1;});
var pre=document.createElement('pre');pre.id='kd-probe';pre.textContent=JSON.stringify(out);
document.body.appendChild(pre);},300);});</script>"""


def _chromium() -> str | None:
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG file, read from its IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def _browser_cmd(browser: str, profile: Path) -> list[str]:
    return [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
        "--hide-scrollbars", f"--user-data-dir={profile}", "--virtual-time-budget=15000",
    ]


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
    cmd = [*_browser_cmd(browser, tmp_path / "profile"), "--window-size=1280,2000", "--dump-dom", probed.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="kd-probe">(.*?)</pre>', proc.stdout, re.S)
    assert m, f"the probe did not report (exit {proc.returncode}); stderr tail: {proc.stderr[-2000:]}"
    import html

    out = json.loads(html.unescape(m.group(1)))
    assert out["errors"] == []
    summary = json.loads(re.search(r"id='kdsearch-report-data'>(.*?)</script>", page).group(1))
    assert out["plots"] == len(summary["figures"]) == 8
    assert out["empty"] == [] and sorted(out["drawn"]) == sorted(summary["figures"])
    assert out["initial"] == [0, 1, 4, 7]
    assert out["asc"] == [0, 1, 4, 7]  # accuracy 0.41 < 0.62 < 0.70 < 0.74
    assert out["desc"] == [7, 4, 1, 0]
    assert out["lat"] == [0, 1, 4, 7]  # latency 0.5 < 1.2 < 1.8 < 1.95
    # At a glance is the first section, near the top: the teacher, the best per objective, the default export.
    assert out["glance_first"] is True and out["glance_top"] < 200
    assert out["glance_roles"] == [["teacher", "—"], ["best val_accuracy (max)", "7"], ["best macs (min)", "0"],
                                   ["default export", "7"]]
    assert out["ref_lines"] == {"fig-acc-macs": 1, "fig-acc_latency": 1}  # the teacher's dashed line, drawn

    # A screenshot of the top of the page, kept where a person can look at it.
    shot = tmp_path / "report.png"
    cmd = [*_browser_cmd(browser, tmp_path / "profile2"), "--window-size=1300,1800", f"--screenshot={shot}",
           report.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), f"no screenshot (exit {proc.returncode}); stderr tail: {proc.stderr[-2000:]}"
    assert _png_size(shot) == (1300, 1800) and shot.stat().st_size > 50_000  # a drawn page, not a blank one
    ARTIFACTS.mkdir(exist_ok=True)
    kept = ARTIFACTS / "report.png"
    shutil.copyfile(shot, kept)
    print(f"report screenshot: {kept} (and {shot})")
