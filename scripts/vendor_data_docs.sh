#!/usr/bin/env bash
# Fetch the scripts and styles that Great Expectations' Data Docs load from public CDNs, from the
# npm registry (`npm pack NAME@VERSION`), into medops/datadocs/vendor/, so the docs work offline.
# The versions are the ones GX 1.x's templates name (great_expectations/render/view/templates);
# the CDN URL -> file table is medops/datadocs/__init__.py's ASSETS. Rerun after a GX upgrade that
# changes them, then run tests/integration/test_data_docs_offline.py.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=medops/datadocs/vendor
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# package spec                  files to keep, relative to the package (plus its licence)
PACKAGES=(
  "bootstrap@4.3.1               dist/css/bootstrap.min.css dist/js/bootstrap.min.js"
  "jquery@3.7.1                  dist/jquery.min.js"
  "popper.js@1.12.9              dist/umd/popper.min.js"
  "bootstrap-table@1.19.1        dist/bootstrap-table.min.css dist/bootstrap-table.min.js dist/extensions/filter-control/bootstrap-table-filter-control.min.css dist/extensions/filter-control/bootstrap-table-filter-control.min.js"
  "bootstrap-datepicker@1.9.0    dist/css/bootstrap-datepicker.min.css dist/js/bootstrap-datepicker.min.js"
  "@forevolve/bootstrap-dark@1.1.0 dist/css/bootstrap-prefers-dark.css"
  "vega@5.33.1                   build/vega.min.js"
  "vega-lite@5.23.0              build/vega-lite.min.js"
  "vega-embed@6.29.0             build/vega-embed.min.js"
  "@fortawesome/fontawesome-free@6.6.0 css/all.min.css webfonts/fa-brands-400.woff2 webfonts/fa-regular-400.woff2 webfonts/fa-solid-900.woff2 webfonts/fa-v4compatibility.woff2"
)

# package folders are rebuilt; README.md (the notice) stays
find "$DEST" -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +
for entry in "${PACKAGES[@]}"; do
  read -r spec files <<<"$entry"
  name=${spec%@*}; version=${spec##*@}
  folder="$DEST/$(echo "$name" | tr -d '@' | tr '/' '-')"
  (cd "$WORK" && npm pack --silent "$spec" >/dev/null)
  tarball=$(ls "$WORK"/*.tgz)
  mkdir -p "$WORK/x" && tar xzf "$tarball" -C "$WORK/x"
  for f in $files; do
    mkdir -p "$folder/$(dirname "$f")"
    # source maps are not shipped: drop the comment that points at them (else devtools ask for them)
    sed -e '/^\/[/*][#@] sourceMappingURL=.*$/d' "$WORK/x/package/$f" > "$folder/$f"
  done
  for lic in LICENSE LICENSE.txt LICENSE.md; do
    if [ -f "$WORK/x/package/$lic" ]; then cp "$WORK/x/package/$lic" "$folder/$lic"; fi
  done
  # vega and popper.js publish no licence file on npm: the text from their repositories
  if ! ls "$folder"/LICENSE* >/dev/null 2>&1; then cp "scripts/licenses/$name.LICENSE" "$folder/LICENSE"; fi
  echo "$spec $(node -p "require('$WORK/x/package/package.json').license")" >> "$WORK/versions"
  rm -rf "$WORK/x" "$tarball"
done
echo "fetched into $DEST:"; cat "$WORK/versions"
