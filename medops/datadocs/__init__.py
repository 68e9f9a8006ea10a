"""Great Expectations Data Docs that work without internet access.

GX 1.x renders Data Docs pages that load Bootstrap, jQuery, popper.js, bootstrap-table,
bootstrap-datepicker, Font Awesome and Vega from public CDNs (its Jinja templates name the URLs;
its ``custom_views_directory`` cannot override them, GX's own templates come first). On a machine
without internet, as in many hospitals, the index then shows bare links and an empty list of
validations. ``make_offline`` copies the same files, shipped with medops in ``vendor/`` (fetched
from the npm registry by scripts/vendor_data_docs.sh, each with its licence), into the site's
``static/vendor/`` and points every page at them with relative URLs, so the site still opens from
the file system and can be copied elsewhere whole.

No Great Expectations import here: this works on the HTML GX wrote.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

VENDOR = Path(__file__).resolve().parent / "vendor"
SITE_VENDOR = Path("static") / "vendor"  # where the files go inside a Data Docs site

# CDN URL (as GX's templates write it) -> file under vendor/. scripts/vendor_data_docs.sh fetches
# these very versions; tests/unit/test_data_docs.py checks that every file exists and that GX's
# installed templates name no CDN URL missing here.
ASSETS: dict[str, str] = {
    "https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css":
        "bootstrap/dist/css/bootstrap.min.css",
    "https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js":
        "bootstrap/dist/js/bootstrap.min.js",
    "https://code.jquery.com/jquery-3.7.1.min.js": "jquery/dist/jquery.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js":
        "popper.js/dist/umd/popper.min.js",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.css":
        "bootstrap-table/dist/bootstrap-table.min.css",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.js":
        "bootstrap-table/dist/bootstrap-table.min.js",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/extensions/filter-control/bootstrap-table-filter-control.min.js":
        "bootstrap-table/dist/extensions/filter-control/bootstrap-table-filter-control.min.js",
    # GX names 1.19.0 for the filter-control styles (and 1.19.1 for everything else): one copy
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.min.css":
        "bootstrap-table/dist/extensions/filter-control/bootstrap-table-filter-control.min.css",
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.css":
        "bootstrap-table/dist/extensions/filter-control/bootstrap-table-filter-control.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/css/bootstrap-datepicker.min.css":
        "bootstrap-datepicker/dist/css/bootstrap-datepicker.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/js/bootstrap-datepicker.min.js":
        "bootstrap-datepicker/dist/js/bootstrap-datepicker.min.js",
    "https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/bootstrap-prefers-dark.css":
        "forevolve-bootstrap-dark/dist/css/bootstrap-prefers-dark.css",
    "https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css":
        "fortawesome-fontawesome-free/css/all.min.css",
    "https://cdn.jsdelivr.net/npm/vega@5": "vega/build/vega.min.js",
    "https://cdn.jsdelivr.net/npm/vega-lite@5": "vega-lite/build/vega-lite.min.js",
    "https://cdn.jsdelivr.net/npm/vega-embed@6": "vega-embed/build/vega-embed.min.js",
}

# The GX logo in the top bar comes from GX's web-assets bucket (with a tracking query string);
# GX copies the same images into every site's static/images/.
_GX_IMAGES = re.compile(r"https://great-expectations-web-assets\.s3\.us-east-2\.amazonaws\.com/([\w.-]+)(\?[^\"']*)?")
# Subresource integrity and CORS mode name the CDN copy; a page opened from the file system has
# no origin, so Chromium refuses a local script that asks for CORS.
_SRI = re.compile(r'\s+(?:integrity="[^"]*"|crossorigin="[^"]*")')


def _relative_prefix(page: Path, site_dir: Path) -> str:
    """``../`` as many times as ``page`` is deep below ``site_dir`` ("" for the index)."""
    depth = len(page.relative_to(site_dir).parts) - 1
    return "../" * depth


def localize_page(html: str, prefix: str) -> str:
    """``html`` with every CDN URL of ASSETS (and the GX logo) replaced by the site's local copy,
    ``prefix`` being the way from the page up to the site's root folder."""
    for url, rel in ASSETS.items():
        # whole attribute values only: vega@5 is a prefix of nothing else, but stay exact
        html = html.replace(f'"{url}"', f'"{prefix}{SITE_VENDOR.as_posix()}/{rel}"')
    html = _GX_IMAGES.sub(lambda m: f"{prefix}static/images/{m.group(1)}", html)
    return _SRI.sub("", html)


def make_offline(site_dir: Path | str) -> int:
    """Copy the vendored assets into ``site_dir/static/vendor`` and rewrite the site's pages to use
    them. Idempotent (a page already rewritten is left as it is); returns how many pages changed."""
    site_dir = Path(site_dir)
    target = site_dir / SITE_VENDOR
    shutil.copytree(VENDOR, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("README.md"))
    changed = 0
    for page in sorted(site_dir.rglob("*.html")):
        html = page.read_text(encoding="utf-8")
        new = localize_page(html, _relative_prefix(page, site_dir))
        if new != html:
            tmp = page.with_suffix(".html.tmp")
            tmp.write_text(new, encoding="utf-8")
            os.replace(tmp, page)
            changed += 1
    return changed


def remote_urls(html: str) -> list[str]:
    """The http(s) URLs a page would *load* (scripts, styles, images), not the links it shows."""
    pattern = r'<(?:script|img)[^>]*\ssrc="(https?://[^"]+)"|<link[^>]*\shref="(https?://[^"]+)"'
    return [a or b for a, b in re.findall(pattern, html)]
