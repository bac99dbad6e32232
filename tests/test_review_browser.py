"""The review page in a real browser: Debian's chromium, driven by Selenium through chromedriver.

A real ``sorter serve`` process on loopback serves a database filled by a real scan of an archive
with one mislabelled series (CT slices whose header says MR). The browser finds the discrepancy
in the queue, opens the series, sees its thumbnails decoded, turns Grad-CAM on with the keyboard,
confirms the series as CT with the keyboard, and lands on the next page; the ``reviews`` row and
``sorter export --reviewed`` must then say CT.

Skips when chromium or chromedriver is missing, unless ``SORTER_TEST_REQUIRE_BROWSER=1`` (CI),
where it fails. ``SORTER_SCREENSHOT_DIR`` keeps a screenshot of the series page (the README's).
"""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from db_support import query, scan, sorter
from review_support import PER_SERIES, make_archive

from sorter.model.artefact import DEFAULT_MODEL_PATH

pytestmark = pytest.mark.corpus

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def _require_browser() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        message = (
            f"no {' or '.join(missing)} (apt-get install chromium chromium-driver); browser test skipped"
        )
        if os.environ.get("SORTER_TEST_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def server(request, corpus: Path, tmp_path: Path) -> Iterator[tuple[str, str, dict[str, str]]]:
    """``sorter serve`` over a scanned archive: (base URL, database URL, UIDs); an indirect
    parameter is its ``--root-path`` (the base URL then ends with it)."""
    root = getattr(request, "param", "")
    url = f"sqlite:///{tmp_path / 'sorter.db'}"
    uids = make_archive(corpus, tmp_path / "archive")
    assert scan(url, DEFAULT_MODEL_PATH, tmp_path / "archive", tmp=tmp_path)["classified"] == PER_SERIES * 3
    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sorter",
            "serve",
            "--port",
            str(port),
            "--reviewer",
            "ana",
            "--root-path",
            root,
        ],
        env={**os.environ, "SORTER_DATABASE_URL": url},
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}{root}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(base + "/healthz", timeout=2).read()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError((tmp_path / "serve.log").read_text()) from None
                time.sleep(0.2)
        yield base, url, uids
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()


@pytest.fixture()
def browser() -> Iterator[object]:
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _images_loaded(driver, selector: str) -> bool:
    return bool(
        driver.execute_script(
            "const imgs = Array.from(document.querySelectorAll(arguments[0]));"
            "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);",
            selector,
        )
    )


def test_a_reviewer_finds_the_mislabelled_series_and_confirms_it(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, url, uids = server
    driver, wait = browser, WebDriverWait(browser, 60)
    target = uids["ct_labelled_mr"]

    driver.get(base + "/")
    assert "Overview" in driver.find_element(By.TAG_NAME, "h1").text
    driver.find_element(By.LINK_TEXT, "Series").click()
    wait.until(lambda d: "/queue" in d.current_url)
    links = [a.text for a in driver.find_elements(By.CSS_SELECTOR, "table.queue a.uid")]
    assert links == [target]  # the one mislabelled series, and no honest one

    driver.find_element(By.LINK_TEXT, target).click()
    wait.until(lambda d: f"/series/{target}" in d.current_url)
    assert driver.find_element(By.ID, "header-label").text == "MR"
    assert driver.find_element(By.ID, "series-label").text == "CT"
    wait.until(lambda d: _images_loaded(d, ".thumb img"))
    assert len(driver.find_elements(By.CSS_SELECTOR, ".thumb img")) == PER_SERIES
    shots = os.environ.get("SORTER_SCREENSHOT_DIR")
    if shots:
        driver.save_screenshot(str(Path(shots) / "review-series.png"))

    body = driver.find_element(By.TAG_NAME, "body")
    body.send_keys("g")  # Grad-CAM on
    wait.until(
        lambda d: all(
            "gradcam.png" in i.get_attribute("src") for i in d.find_elements(By.CSS_SELECTOR, ".thumb img")
        )
    )
    wait.until(lambda d: _images_loaded(d, ".thumb img"))
    if shots:
        driver.save_screenshot(str(Path(shots) / "review-gradcam.png"))

    body.send_keys("1")  # the first label, CT
    assert driver.find_element(By.ID, "true-label").get_attribute("value") == "CT"
    body.send_keys("c")  # confirm: the header is wrong
    wait.until(lambda d: f"/series/{target}" not in d.current_url)

    [row] = query(url, "SELECT level, uid, decision, label, reviewer, is_current FROM reviews")
    assert tuple(row) == ("series", target, "confirm", "CT", "ana", 1)
    # the queue no longer lists it; the decision shows under "confirm"
    driver.get(base + "/queue?level=series")
    assert driver.find_elements(By.ID, "empty")
    driver.get(base + "/queue?level=series&review=confirm")
    assert [a.text for a in driver.find_elements(By.CSS_SELECTOR, "table.queue a.uid")] == [target]

    out = tmp_path / "reviewed.csv"
    sorter("export", "--reviewed", "--out", str(out), url=url)
    labels = {(r["label"], r["header_modality"]) for r in csv.DictReader(out.open())}
    assert labels == {("CT", "MR")}


@pytest.mark.parametrize("server", ["/imaging/sorter"], indirect=True)
def test_behind_a_proxy_under_a_prefix_every_link_keeps_it(server, browser):
    """A reverse proxy that serves the page under https://host/imaging/sorter/ and passes the path
    on: every link, image, form and redirect must stay under the prefix (only the prefixed paths
    exist, so one that drops it fails here)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, url, uids = server
    driver, wait = browser, WebDriverWait(browser, 60)
    target = uids["ct_labelled_mr"]
    driver.get(base + "/")
    assert "Overview" in driver.find_element(By.TAG_NAME, "h1").text
    rules = "return Array.from(document.styleSheets).reduce((n, s) => n + s.cssRules.length, 0)"
    assert driver.execute_script(rules) > 0  # the stylesheet came from under the prefix
    driver.find_element(By.LINK_TEXT, "Series").click()
    wait.until(lambda d: d.current_url.startswith(base + "/queue"))
    driver.find_element(By.LINK_TEXT, target).click()
    wait.until(lambda d: d.current_url.startswith(f"{base}/series/{target}"))
    wait.until(lambda d: _images_loaded(d, ".thumb img"))
    body = driver.find_element(By.TAG_NAME, "body")
    body.send_keys("1")
    body.send_keys("c")  # confirm: the form posts under the prefix and redirects within it
    wait.until(lambda d: f"/series/{target}" not in d.current_url)
    assert driver.current_url.startswith(base + "/"), driver.current_url
    assert "Not Found" not in driver.find_element(By.TAG_NAME, "body").text
    [row] = query(url, "SELECT uid, decision, label FROM reviews")
    assert tuple(row) == (target, "confirm", "CT")
