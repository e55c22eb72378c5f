"""The HTML report in a real browser: headless Chromium loads summary.html, tables and plots render.

Chromium is Debian's package; when /usr/bin/chromium is missing and we are root, the set-up installs
it (apt-get update && apt-get install -y chromium), else the test is skipped with the reason.
The screenshot is kept as test-artifacts/report_summary.png (repo root, git-ignored).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.report import run_report
from pipeline.storage import Store
from tests.unit.test_report import write_tree

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"

pytestmark = pytest.mark.slow

# Appended to a copy of the page (the report itself carries no script): after load, record what rendered.
CHECK_SCRIPT = """
<script>
window.addEventListener('load', function () {
  var imgs = Array.from(document.images).map(function (i) {
    return {id: i.id, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight, shown_w: i.getBoundingClientRect().width};
  });
  var tables = Array.from(document.querySelectorAll('table')).map(function (t) {
    return {id: t.id, rows: t.querySelectorAll('tbody tr').length, h: t.getBoundingClientRect().height};
  });
  var out = {imgs: imgs, tables: tables, title: document.title,
             scrollWidth: document.documentElement.scrollWidth, scrollHeight: document.documentElement.scrollHeight, innerWidth: window.innerWidth,
             badges: Array.from(document.querySelectorAll('#results .badge')).map(function (b) { return b.textContent; }),
             diag: document.querySelectorAll('td.diag').length};
  var pre = document.createElement('pre');
  pre.id = 'render-check';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio"]


def chromium_binary() -> str:
    for cand in ("/usr/bin/chromium", shutil.which("chromium") or "", shutil.which("chromium-browser") or ""):
        if cand and os.access(cand, os.X_OK):
            return cand
    if os.geteuid() != 0:
        pytest.skip("Chromium is not installed and we are not root: apt-get install -y chromium")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "update"], check=True, capture_output=True, timeout=600, env=env)
        subprocess.run(["apt-get", "install", "-y", "chromium"], check=True, capture_output=True, timeout=1200, env=env)
    except (subprocess.SubprocessError, OSError) as e:
        pytest.skip(f"could not install Chromium with apt-get ({e})")
    if not os.access("/usr/bin/chromium", os.X_OK):
        pytest.skip("apt-get install chromium did not provide /usr/bin/chromium")
    return "/usr/bin/chromium"


def run_chromium(binary: str, profile: Path, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    cmd = [binary, *FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_report_renders_in_headless_chromium(tmp_path):
    binary = chromium_binary()
    cfg = load_config(ROOT / "configs" / "demo.yaml", output=str(tmp_path / "out"))
    store = Store(cfg.output)
    write_tree(store)
    t0, c0 = time.monotonic(), time.process_time()
    out = run_report(cfg)
    render_s, render_cpu = time.monotonic() - t0, time.process_time() - c0
    page = Path(out["html"])
    size_kb = page.stat().st_size / 1024

    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    t0 = time.monotonic()
    r = run_chromium(binary, tmp_path / "profile-dom", "--window-size=1280,2000", "--virtual-time-budget=5000",
                     "--dump-dom", probe.as_uri())
    dom_s = time.monotonic() - t0
    m = re.search(r'<pre id="render-check">(.*?)</pre>', r.stdout, re.S)
    assert m, f"no render check in the DOM (rc {r.returncode}): {r.stderr[-1500:]}"
    check = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))

    imgs = {i["id"]: i for i in check["imgs"]}
    assert set(imgs) == {"plot-loss_curves", "plot-perplexity", "plot-eval_matrix"}
    for i in imgs.values():
        assert i["complete"] and i["w"] > 200 and i["h"] > 100 and i["shown_w"] > 200, i
    tables = {t["id"]: t for t in check["tables"]}
    assert tables["results"]["rows"] == 4 and tables["results"]["h"] > 50
    assert tables["matrix-loss"]["rows"] == 3 and tables["matrix-ppl"]["rows"] == 3
    assert tables["sources"]["rows"] == 6 and tables["quarantine"]["rows"] == 6
    assert check["badges"] == ["finished", "finished", "failed", "skipped"]
    assert check["diag"] == 4  # two adapters on their own domain, in both matrices
    assert check["scrollWidth"] <= check["innerWidth"] + 1, "the page scrolls sideways"

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report_summary.png"
    shot.unlink(missing_ok=True)
    t0 = time.monotonic()
    height = min(int(check["scrollHeight"]) + 20, 9000)  # the whole page, reproducibility block included
    r = run_chromium(binary, tmp_path / "profile-shot", f"--window-size=1280,{height}", "--virtual-time-budget=5000",
                     f"--screenshot={shot}", page.as_uri())
    shot_s = time.monotonic() - t0
    assert shot.is_file(), f"no screenshot (rc {r.returncode}): {r.stderr[-1500:]}"
    shutil.copy(page, ARTIFACTS / "report_summary.html")

    from PIL import Image
    im = Image.open(shot).convert("RGB")
    assert im.size == (1280, height)
    small = im.resize((320, height // 4))
    raw = small.tobytes()
    px = [tuple(raw[i:i + 3]) for i in range(0, len(raw), 3)]
    non_white = sum(1 for p in px if sum(p) < 720) / len(px)
    colours = len(set(px))
    assert non_white > 0.05 and colours > 200, (non_white, colours)  # text, tables and plots, not a blank page
    # the plots themselves are drawn: strong blues of the curves/bars appear
    assert sum(1 for (r_, g, b) in px if b > 150 and r_ < 60) > 20
    print(f"\nreport render {render_s:.2f}s wall ({render_cpu:.2f}s CPU), summary.html {size_kb:.0f} KiB; chromium dump-dom {dom_s:.1f}s, "
          f"screenshot {shot_s:.1f}s; non-white {non_white:.0%}, {colours} colours -> {shot}")
