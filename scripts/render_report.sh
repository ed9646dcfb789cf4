#!/usr/bin/env bash
# Render a `spade report` page to a PNG screenshot with headless Chromium (no server: file:// URL).
#
#   scripts/render_report.sh REPORT_DIR_OR_INDEX_HTML OUT.png [WIDTHxHEIGHT]
#
# e.g. (MVTec AD bottle, after `spade score ... --out /work/runs/bottle-scores`):
#   spade report --scores /work/runs/bottle-scores --masks ../shared/data/mvtec_ad_bottle/ground_truth --out /work/runs/bottle-report
#   scripts/render_report.sh /work/runs/bottle-report /work/runs/bottle-report.png 1400x3000
#
# Needs Chromium: `apt-get install -y chromium` (Debian) or set $CHROMIUM to its binary.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,10p' "$0" >&2
  exit 2
fi
target=$1
out=$2
size=${3:-1400x3000}
[[ -d $target ]] && target=$target/index.html
[[ -f $target ]] || { echo "render_report: no report page at $target" >&2; exit 2; }
browser=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)}
[[ -n $browser ]] || { echo "render_report: Chromium not found; apt-get install -y chromium, or set CHROMIUM" >&2; exit 2; }
page=$(realpath "$target")
out=$(realpath -m "$out")
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$profile" \
  --screenshot="$out" --window-size="${size/x/,}" "file://$page" >/dev/null 2>&1 || true
[[ -s $out ]] || { echo "render_report: Chromium wrote no screenshot to $out" >&2; exit 1; }
echo "$out"
