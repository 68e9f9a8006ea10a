"""medops.datadocs: every CDN file GX's Data Docs load is shipped with medops, with its licence."""

from __future__ import annotations

import re
from pathlib import Path

from medops.datadocs import ASSETS, VENDOR, localize_page, remote_urls


def _gx_template_urls() -> set[str]:
    import great_expectations

    templates = Path(great_expectations.__file__).parent / "render" / "view" / "templates"
    found = set()
    for path in templates.glob("*.j2"):
        found |= set(re.findall(r'(?:src|href)="(https://[^"{]+)"', path.read_text()))
    return found


def test_every_cdn_url_in_the_installed_gx_templates_has_a_local_copy() -> None:
    loaded = {u for u in _gx_template_urls() if not u.startswith("https://great-expectations-web-assets")}
    # links GX shows (its docs, its website) are not loaded by the page; scripts and styles are
    loaded = {u for u in loaded if u.endswith((".js", ".css")) or "/npm/vega" in u}
    assert loaded and loaded <= set(ASSETS), sorted(loaded - set(ASSETS))


def test_the_shipped_files_exist_each_package_with_its_licence() -> None:
    for rel in ASSETS.values():
        assert (VENDOR / rel).is_file(), rel
    packages = {rel.split("/")[0] for rel in ASSETS.values()}
    for package in packages:
        assert list((VENDOR / package).glob("LICENSE*")), f"{package} has no licence file"
    notice = (VENDOR / "README.md").read_text()
    assert all(f"| {package} |" in notice for package in packages)


def test_a_page_is_pointed_at_the_site_copies() -> None:
    page = ('<link rel="stylesheet" href="https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css"/>\n'
            '<script src="https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js" '
            'integrity="sha384-x" crossorigin="anonymous"></script>\n'
            '<script src="https://cdn.jsdelivr.net/npm/vega@5"></script>\n'
            '<img src="https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/logo-long.png?d=1&s=2"/>\n'
            '<a href="https://docs.greatexpectations.io/">docs</a>')
    assert len(remote_urls(page)) == 4

    local = localize_page(page, "../../")
    assert remote_urls(local) == []
    assert 'href="../../static/vendor/bootstrap/dist/css/bootstrap.min.css"' in local
    assert '<script src="../../static/vendor/popper.js/dist/umd/popper.min.js"></script>' in local
    assert 'src="../../static/vendor/vega/build/vega.min.js"' in local
    assert 'src="../../static/images/logo-long.png"' in local
    assert 'href="https://docs.greatexpectations.io/"' in local  # a link, not loaded
    assert localize_page(local, "../../") == local
