"""Headless Chromium for the browser tests, or a skip that says how to install it.

Needs Debian's ``chromium`` and ``chromium-driver`` packages (``apt-get install chromium
chromium-driver``) and selenium (the test extra).
"""

from __future__ import annotations

import shutil

import pytest

INSTALL = "apt-get install chromium chromium-driver"


def chromium(*extra_args: str, logging_prefs: dict | None = None):
    """A headless Chromium WebDriver (the caller quits it); skips the test where there is none."""
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[test]')")
    binary = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.skip(f"no Chromium and chromedriver on PATH: {INSTALL}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", *extra_args):
        options.add_argument(arg)
    if logging_prefs:
        options.set_capability("goog:loggingPrefs", logging_prefs)
    return webdriver.Chrome(service=Service(driver_path), options=options)
