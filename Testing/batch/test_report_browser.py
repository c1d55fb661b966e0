"""report.html in a real browser (headless Chromium through Selenium), opened from disk (file://):
one row per case, sorting by a click on a header, paging, the URL-hash state, a thumbnail that
loads, text that stays text, and a screenshot. Skipped where Chromium or its driver is absent
(Debian: ``apt-get install chromium chromium-driver``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from HiMatchADLib.batch import STATUS_OK
from HiMatchADLib.batch.report import write_report
from test_report import EVIL, make_cohort

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed: pip install -e '.[test]'")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM_OPTIONS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,1200",
)


def find_chromium() -> tuple:
    """``(chromium, chromedriver)`` paths, or a skip saying what to install."""
    browser = next((p for p in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")) if p and Path(p).exists()), None)
    driver = next((p for p in ("/usr/bin/chromedriver", shutil.which("chromedriver")) if p and Path(p).exists()), None)
    if browser is None:
        pytest.skip("chromium not found: install Debian's chromium and chromium-driver")
    if driver is None:
        pytest.skip("chromedriver not found: install Debian's chromium and chromium-driver")
    return browser, driver


def start_browser(profile: Path):
    """Headless Chromium with an explicit driver and profile (Selenium Manager never runs)."""
    browser, driver = find_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in CHROMIUM_OPTIONS:
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={profile}")
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    drv = start_browser(tmp_path_factory.mktemp("chromium-profile"))
    yield drv
    drv.quit()


def open_page(drv, path: Path, hash_: str = "") -> None:
    drv.get(path.as_uri() + (f"#{hash_}" if hash_ else ""))
    WebDriverWait(drv, 20).until(lambda d: d.execute_script("return document.documentElement.dataset.firstRender !== undefined"))


def cells(drv, cls: str) -> list:
    return [td.text for td in drv.find_elements(By.CSS_SELECTOR, f"#case-rows td.{cls}")]


def test_the_page_in_chromium(browser, tmp_path):
    rows = make_cohort(tmp_path / "out", n_ok=4)
    page = write_report(tmp_path / "out")
    open_page(browser, page)

    shown = cells(browser, "case")
    assert shown == [r["case"] for r in rows]  # every case on the one page, in summary order
    assert browser.find_element(By.ID, "page-info").text == "page 1 of 1"
    assert f"sub dir/{EVIL}.nii.gz" in shown  # text stays text
    assert browser.execute_script("return window.pwned === undefined")  # a message's </script> ran nothing

    head = browser.find_element(By.CSS_SELECTOR, '#case-head th[data-key="volume_score"]')
    head.click()
    WebDriverWait(browser, 10).until(lambda d: "sort=volume_score" in d.current_url)
    scores = cells(browser, "score")
    numbers = [float(s) for s in scores if s]
    assert len(numbers) == 5 and numbers == sorted(numbers, reverse=True)
    assert scores[len(numbers):] == ["", ""]  # failed and skipped rows (no score) last
    assert "dir=desc" in browser.current_url and head.get_attribute("aria-sort") == "descending"
    head.click()
    WebDriverWait(browser, 10).until(lambda d: "dir=asc" in d.current_url)
    scores = cells(browser, "score")
    assert [float(s) for s in scores if s] == sorted(numbers) and scores[-2:] == ["", ""]

    WebDriverWait(browser, 20).until(lambda d: d.execute_script(
        "var i = document.querySelector('#case-rows img.thumb'); return i !== null && i.complete && i.naturalWidth > 0"
    ))
    assert browser.execute_script("return document.querySelector('#case-rows img.thumb').naturalWidth") == 24

    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot))
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_paging_filtering_and_the_hash_state(browser, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    rows = [{"case": f"case{i:04d}", "status": STATUS_OK, "volume_score": (i * 37) % 230 / 10.0, "seconds": 1.0, "message": ""}
            for i in range(230)]
    rows.append({"case": "late", "status": "failed", "message": "cannot read it", "volume_score": ""})
    page = write_report(out, rows)

    open_page(browser, page)
    assert len(cells(browser, "case")) == 100
    assert browser.find_element(By.ID, "page-info").text == "page 1 of 3"
    browser.find_element(By.ID, "page-next").click()
    WebDriverWait(browser, 10).until(lambda d: "page=2" in d.current_url)
    assert cells(browser, "case")[0] == "case0100"
    browser.find_element(By.ID, "page-last").click()
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "page-info").text == "page 3 of 3")
    assert len(cells(browser, "case")) == 31 and browser.find_element(By.ID, "page-next").get_attribute("disabled")

    open_page(browser, page, "sort=volume_score&dir=desc&page=2")  # a state from the URL
    assert browser.find_element(By.ID, "page-info").text == "page 2 of 3"
    expected = sorted((r for r in rows if r["volume_score"] != ""), key=lambda r: -r["volume_score"])
    shown = [float(s) for s in cells(browser, "score")]
    assert shown == [r["volume_score"] for r in expected[100:200]]

    box = browser.find_element(By.ID, "filter-text")
    box.send_keys("cannot READ")
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "cases").get_attribute("data-matching") == "1")
    assert cells(browser, "case") == ["late"] and browser.find_element(By.ID, "page-info").text == "page 1 of 1"
    open_page(browser, page, "status=failed")
    assert cells(browser, "case") == ["late"]
    assert browser.find_element(By.ID, "filter-status").get_attribute("value") == "failed"
