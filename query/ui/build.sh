#!/usr/bin/env bash
# Builds Lumen's web UI into dist/ (committed; the lumen binary embeds it,
# so `cargo build` needs no npm). Run after changing anything in src/:
#   query/ui/build.sh
# Needs node and npm (https://nodejs.org); fetches the pinned packages of
# package-lock.json (uPlot, Apache Arrow JS, esbuild) into node_modules/.
set -euo pipefail
cd "$(dirname "$0")"
npm ci --no-audit --no-fund --loglevel=error
mkdir -p dist
# One ES module: the pages, uPlot and the parts of Arrow JS they import.
./node_modules/.bin/esbuild src/app.js --bundle --minify --format=esm \
  --target=es2020 --legal-comments=eof --outfile=dist/app.js
./node_modules/.bin/esbuild src/style.css --bundle --minify --outfile=dist/app.css
cp src/index.html src/favicon.svg dist/
for f in index.html app.js app.css favicon.svg; do
  gzip -9 -n -c "dist/$f" > "dist/$f.gz"
done
# What dist/ was built from; a test fails when the sources change without
# a rebuild.
LC_ALL=C sha256sum build.sh package-lock.json src/* | LC_ALL=C sort -k2 > dist/SOURCES
ls -l dist
