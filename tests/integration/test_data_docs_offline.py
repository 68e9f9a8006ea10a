"""The quality stage's Data Docs opened in headless Chromium with no network, as on a hospital
machine without internet access: the list of validations and a result table must render.

Needs Chromium and its driver (Debian: ``apt-get install chromium chromium-driver``) and selenium
(the test extra); skipped, saying so, without them.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from _chromium import chromium

from medops.config import QualityConfig
from medops.stages import quality

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# every host name resolves to nothing: a CDN request fails as it would offline
OFFLINE = "--host-resolver-rules=MAP * ~NOTFOUND"


@pytest.fixture(scope="module")
def browser():
    driver = chromium(OFFLINE, logging_prefs={"performance": "ALL"})
    yield driver
    driver.quit()


def _open(driver, page: Path) -> list[str]:
    """Open ``page``; return the URL of every request it made (from Chromium's network log)."""
    driver.get_log("performance")  # drop the previous page's entries
    driver.get(page.as_uri())
    time.sleep(1.0)  # bootstrap-table renders after the document is ready
    events = [json.loads(entry["message"])["message"] for entry in driver.get_log("performance")]
    return [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]


def _rows(driver, selector: str) -> list[str]:
    return [row.text for row in driver.find_elements("css selector", selector) if row.text.strip()]


def test_data_docs_render_offline(browser, tmp_path: Path) -> None:
    from test_quality_gx import build_ingested

    ingested = tmp_path / "ingested"
    table = build_ingested(ingested)
    out = tmp_path / "quality"
    quality.run(QualityConfig(), ingested_dir=ingested, out_dir=out)
    table.loc[:2, "patient_sex"] = "X"  # a warning on the second run
    table.to_parquet(ingested / "metadata.parquet", index=False)
    result = quality.run(QualityConfig(), ingested_dir=ingested, out_dir=out)

    requests = _open(browser, Path(result.data_docs))
    # nothing left for the internet (inline images are data: URLs)
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == []
    assert browser.execute_script("return typeof jQuery !== 'undefined' && !!jQuery.fn.bootstrapTable")
    runs = _rows(browser, "#section-1 table tbody tr, table.table tbody tr")
    assert len(runs) == 2, runs  # both runs listed, each with its suite
    assert all(quality.SUITE in row for row in runs)
    screenshot = Path(os.environ.get("MEDOPS_SCREENSHOT_DIR", tmp_path)) / "data-docs-offline-index.png"
    browser.save_screenshot(str(screenshot))

    page = sorted((out / "data_docs" / "validations").rglob("*.html"))[-1]  # the newest run
    requests = _open(browser, page)
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == []
    cells = " ".join(_rows(browser, "table tbody tr"))
    assert "Must have greater than or equal to" in cells and "sop_instance_uid" in cells
    assert "Unsuccessful Expectations" in cells
    browser.save_screenshot(str(screenshot.with_name("data-docs-offline-validation.png")))
