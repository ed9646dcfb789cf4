#!/usr/bin/env bash
# Usage: fetch_engines.sh DEST  -> DEST/flink-1.19.0/{lib,bin}, DEST/spark-3.5.0/{jars,bin}
#
# Apache Flink and Spark distributions for the cluster tests (tests/test_clusters.py): a Flink session cluster and a
# Spark standalone cluster of separate processes, at the versions Beam 2.62's flink-1.19 and spark-3 runners are built
# on. Apache's download sites are not reachable here, but PyPI serves both distributions inside Python packages: the
# sdist of apache-flink-libraries (PyFlink's jars) and of pyspark (Spark's jars and scripts). pip downloads them once
# (no install: nothing of them is imported) and their deps/ folders are unpacked. A distribution already in DEST is
# kept (re-runs only check).
set -euo pipefail
DEST=$(realpath -m "$1"); mkdir -p "$DEST"
fetch() {  # name version package top-folders...
  local name=$1 version=$2 package=$3; shift 3
  local home="$DEST/$name-$version"; [ -f "$home/.complete" ] && return 0
  local work; work=$(mktemp -d)
  python3 -m pip download -q --no-deps --no-binary :all: -d "$work" "$package==$version"
  tar -xzf "$work"/*.tar.gz -C "$work"
  rm -rf "$home" && mkdir -p "$home"
  for folder in "$@"; do cp -r "$work"/*/deps/"$folder" "$home/"; done
  echo "$name $version (from the $package $version sdist)" > "$home/RELEASE"  # Spark's launcher looks for it
  touch "$home/.complete"; rm -rf "$work"; echo "unpacked $home"
}
fetch flink 1.19.0 apache-flink-libraries lib bin
fetch spark 3.5.0 pyspark jars bin sbin
