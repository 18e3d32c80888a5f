"""``lads serve`` in a real browser: Debian's chromium driven by Selenium loads the page from a
running server, uploads an image, types two expressions, and finds both boxes and both subnet
summaries; the page's screenshot is written to ``test-artifacts/serve-page.png``."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="no chromium + chromedriver here (Debian: apt-get install chromium "
                                       "chromium-driver; .ci/run installs them)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=[None, "s3cret-key"], ids=["open", "api-key"])
def server(trained, request):
    """(URL, API key or None) of a running ``lads serve``."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("LADS_API_KEY", None)
    if request.param:
        env["LADS_API_KEY"] = request.param
    proc = subprocess.Popen([sys.executable, "-m", "lads.cli", "serve", "--checkpoint", str(trained[0]),
                             "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    health = urllib.request.Request(f"{url}/v1/health", headers={"X-API-Key": request.param or ""})
    while time.time() < deadline:
        try:
            if json.load(urllib.request.urlopen(health, timeout=2)) == {"status": "ok"}:
                break
        except OSError:
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.3)
    yield url, request.param
    proc.terminate()
    proc.wait(timeout=30)


def test_the_page_finds_two_boxes_in_a_real_browser(server, synth_data):
    """Without a key, and with one: the page asks for it once and sends it with every call
    (the example thumbnails too)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    from lads.datasets import load_records

    record = load_records(synth_data, "test")[0][0]
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1400"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        url, key = server
        browser.get(url)
        if key:
            WebDriverWait(browser, 30).until(expected_conditions.alert_is_present())
            prompt = browser.switch_to.alert
            assert "API key" in prompt.text
            prompt.send_keys(key)
            prompt.accept()
        WebDriverWait(browser, 30).until(lambda b: "parameters" in b.find_element(By.ID, "model").text)
        WebDriverWait(browser, 30).until(lambda b: b.execute_script(  # thumbnails fetched with the key
            "const i = [...document.querySelectorAll('img.example')];"
            "return i.length > 0 && i.every(x => x.complete && x.naturalWidth > 0)"))
        browser.find_element(By.ID, "file").send_keys(str(Path(record.image).resolve()))
        browser.find_element(By.ID, "expressions").send_keys(f"{record.expression}\nthe leftmost object")
        browser.find_element(By.ID, "run").click()
        WebDriverWait(browser, 60).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".result")) == 2)
        results = browser.find_elements(By.CSS_SELECTOR, ".result")
        assert [r.find_element(By.CSS_SELECTOR, ".expression").text for r in results] == [
            f"1. {record.expression}", "2. the leftmost object"]
        for r in results:
            assert len(json.loads(r.get_attribute("data-box"))) == 4
            assert "bottlenecks" in r.find_element(By.CSS_SELECTOR, ".summary").text
        assert browser.find_element(By.ID, "error").text == ""
        assert browser.find_element(By.ID, "subnets").get_attribute("src").startswith("data:image/png;base64,")
        artifacts = ROOT / "test-artifacts"
        artifacts.mkdir(exist_ok=True)
        assert browser.save_screenshot(str(artifacts / f"serve-page{'-key' if key else ''}.png"))
    finally:
        browser.quit()
