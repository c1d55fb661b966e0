"""Speed of ``report.html`` (the batch's cohort page) with many cases: writing it, and using it in Chromium.

    python benchmarks/report_page.py [--cases 10000] [--slices 155] [--repeat 5] [--json]

Generates an output folder of ``--cases`` finished cases (``summary.csv``, one scores JSON per case
with ``--slices`` slice scores, a provenance and settings, and one shared tiny PNG as every case's
overview picture; no maps), plus one failed case in 50. Then:

- ``write``: :func:`HiMatchADLib.batch.report.write_report` from ``summary.csv`` (what ``himatchad
  report`` and the end of a batch do: every scores JSON is read), the median of ``--repeat`` runs;
- ``load``: the page opened from disk in headless Chromium (Selenium, Debian's chromium and
  chromium-driver): ``first render`` is the page's own ``performance.now()`` at the end of its first
  render (milliseconds since navigation start: HTML parsed, the JSON parsed, 100 rows built),
  ``driver.get`` the wall time of the navigation as Selenium sees it (until the load event);
- ``sort``: a click on the volume-score header until the re-rendered page is laid out (filter, sort
  of every row, 100 rows built), alternating the direction; ``page change``: a click on "next";
  ``filter``: a text typed in the search box (every row's case and reason searched).

Times are medians over ``--repeat``; each load is a fresh navigation.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from HiMatchADLib.batch.report import write_report  # noqa: E402
from HiMatchADLib.batch.summary import SUMMARY_COLUMNS  # noqa: E402

COLUMNS = tuple(SUMMARY_COLUMNS) + (() if "overview" in SUMMARY_COLUMNS else ("overview",))

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

TIMED_CLICK = """
var done = arguments[arguments.length - 1], target = document.querySelector(arguments[0]), t = performance.now();
window.addEventListener("hashchange", function h() {
  window.removeEventListener("hashchange", h);
  void document.body.offsetHeight;  // layout of the new rows
  done(performance.now() - t);
});
target.click();
"""

TIMED_FILTER = """
var done = arguments[arguments.length - 1], box = document.getElementById("filter-text"), t = performance.now();
window.addEventListener("hashchange", function h() {
  window.removeEventListener("hashchange", h);
  void document.body.offsetHeight;
  done(performance.now() - t);
});
box.value = arguments[0];
box.dispatchEvent(new Event("input"));
"""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_folder(out: Path, n: int, slices: int) -> None:
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (96, 64), (180, 60, 30)).save(out / "thumb.png")
    settings = {"version": "0.1.0", "method": "himatch", "model": "facebook/dinov3-vits16-pretrain-lvd1689m", "k": 4,
                "resolution": 448, "sigma": 4.0, "threshold": "auto", "target_fpr": 0.01}
    provenance = {
        "format": 1, "tool": "himatchad", "version": "0.1.0", "method": "himatch", "method_revision": 2,
        "libraries": {"python": "3.11", "numpy": "2", "torch": "2.5"}, "platform": "Linux", "device": "cuda",
        "device_name": "GPU", "precision": "bf16",
        "model": {"id": settings["model"], "weights_digest": "sha256:" + "0" * 64, "licence": "DINOv3 License",
                  "fingerprint": "f", "random_weights": False},
        "bank": {"digest": "d" * 64, "folder": "/data/normals", "files": 120, "slices": 18000}, "settings": settings,
    }
    rows = []
    for i in range(n):
        sub = f"site{i % 20:02d}"
        name = f"subject{i:05d}"
        (out / sub).mkdir(exist_ok=True)
        row = {c: "" for c in COLUMNS}
        if i % 50 == 49:
            row.update(case=f"{sub}/{name}.nii.gz", input=f"/data/{sub}/{name}.nii.gz", status="failed", seconds=0.2,
                       message="cannot read the image: not a readable image")
            rows.append(row)
            continue
        score = round(0.5 + (i * 7919 % 10007) / 10007 * 3.0, 6)
        data = {
            "name": name, "volume_score": score, "threshold": 1.9,
            "threshold_info": {"mode": "auto", "target_fpr": 0.01, "calibrated_threshold": 1.9},
            "anomalous_voxels": i * 13 % 5000, "anomalous_volume_mm3": float(i * 13 % 5000),
            "most_anomalous_slice": i % slices, "slice_scores": [round(0.1 + (j * i % 97) / 97, 6) for j in range(slices)],
            "geometry": {"is_2d": False}, "settings": settings, "provenance": provenance,
            "outputs": {"heatmap": f"{name}_heatmap.nii.gz", "labelmap": f"{name}_labelmap.nii.gz", "scores": f"{name}_scores.json"},
            "complete": True,
        }
        (out / sub / f"{name}_scores.json").write_text(json.dumps(data, indent=1), encoding="utf-8")
        row.update(
            case=f"{sub}/{name}.nii.gz", input=f"/data/{sub}/{name}.nii.gz", status="ok", volume_score=score, threshold=1.9,
            anomalous_voxels=data["anomalous_voxels"], anomalous_volume_mm3=data["anomalous_volume_mm3"],
            most_anomalous_slice=data["most_anomalous_slice"], heatmap=f"{sub}/{name}_heatmap.nii.gz",
            labelmap=f"{sub}/{name}_labelmap.nii.gz", scores=f"{sub}/{name}_scores.json", overview="thumb.png",
            seconds=round(3 + i % 7 * 0.1, 3),
        )
        rows.append(row)
    with (out / "summary.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def browser(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1400,1000", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def measure_browser(page: Path, repeat: int, tmp: Path) -> dict:
    from selenium.webdriver.support.ui import WebDriverWait

    drv = browser(tmp / "profile")
    drv.set_script_timeout(60)
    try:
        loads, gets = [], []
        for _ in range(repeat):
            drv.get("about:blank")
            t = time.perf_counter()
            drv.get(page.as_uri())
            gets.append((time.perf_counter() - t) * 1000)
            WebDriverWait(drv, 60).until(lambda d: d.execute_script("return !!(window.reportTimings && window.reportTimings.first_render)"))
            loads.append(drv.execute_script("return window.reportTimings.first_render"))
        rows_shown = drv.execute_script("return document.querySelectorAll('#case-rows tr').length")
        total = drv.execute_script("return JSON.parse(document.getElementById('report-data').textContent).rows.length")
        sorts = [drv.execute_async_script(TIMED_CLICK, '#case-head th[data-key="volume_score"]') for _ in range(repeat)]
        pages = [drv.execute_async_script(TIMED_CLICK, "#page-next") for _ in range(repeat)]
        filters = [drv.execute_async_script(TIMED_FILTER, text) for text in (["subject0", "site07", "cannot read", "9"] * repeat)[:repeat]]
    finally:
        drv.quit()
    return {
        "rows_embedded": total, "rows_rendered": rows_shown,
        "first_render_ms": statistics.median(loads), "driver_get_ms": statistics.median(gets),
        "sort_ms": statistics.median(sorts), "page_change_ms": statistics.median(pages), "filter_ms": statistics.median(filters),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=10000)
    ap.add_argument("--slices", type=int, default=155, help="slice scores per scores JSON (default 155)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--keep", type=Path, default=None, help="make the folder here and keep it (default: a temporary one)")
    ap.add_argument("--json", action="store_true", help="print the numbers as one JSON object")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="report-bench-") as tmpdir:
        tmp = Path(tmpdir)
        out = args.keep or tmp / "out"
        t = time.perf_counter()
        make_folder(out, args.cases, args.slices)
        made = time.perf_counter() - t
        writes = []
        for _ in range(max(1, min(args.repeat, 3))):
            t = time.perf_counter()
            page = write_report(out)
            writes.append(time.perf_counter() - t)
        result = {
            "cases": args.cases, "slices": args.slices, "cpu": cpu_model(), "folder_s": round(made, 2),
            "write_s": statistics.median(writes), "page_mb": page.stat().st_size / 1e6,
            "json_mb": sum(p.stat().st_size for p in out.rglob("*_scores.json")) / 1e6,
        }
        result.update(measure_browser(page, args.repeat, tmp))
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{result['cases']} cases ({result['json_mb']:.0f} MB of scores JSON, {result['slices']} slice scores each) on {result['cpu']}")
    print("| step | time |\n|---|---|")
    print(f"| write report.html from summary.csv ({result['page_mb']:.1f} MB page) | {result['write_s']:.2f} s |")
    print(f"| first render in Chromium (navigation start to {result['rows_rendered']} rows shown) | {result['first_render_ms']:.0f} ms |")
    print(f"| driver.get (navigation to load event) | {result['driver_get_ms']:.0f} ms |")
    print(f"| sort by volume score (all {result['rows_embedded']} rows) | {result['sort_ms']:.0f} ms |")
    print(f"| page change | {result['page_change_ms']:.0f} ms |")
    print(f"| filter by text | {result['filter_ms']:.0f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
