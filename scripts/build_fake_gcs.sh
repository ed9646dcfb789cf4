#!/usr/bin/env bash
# Usage: build_fake_gcs.sh DEST  -> DEST/fake-gcs-server-<version> (BSD-2-Clause), for the GCS object-store tests.
#
# fake-gcs-server speaks the GCS JSON API, preconditions included (ifGenerationMatch=0: the lease's conditional
# create), in a process of its own. Built from the Go module proxy with `go install` (modules cached in Go's module
# cache). A binary already in DEST is kept (re-runs only check).
set -euo pipefail
DEST=$(realpath -m "$1"); VERSION=v1.56.1
bin="$DEST/fake-gcs-server-$VERSION"; [ -x "$bin" ] && { echo "$bin"; exit 0; }
mkdir -p "$DEST"; w=$(mktemp -d); trap 'rm -rf "$w"' EXIT
GOBIN="$w" go install -trimpath -ldflags '-s -w' "github.com/fsouza/fake-gcs-server@$VERSION"
mv "$w/fake-gcs-server" "$bin"; echo "$bin"
