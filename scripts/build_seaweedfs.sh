#!/usr/bin/env bash
# Usage: build_seaweedfs.sh DEST  -> DEST/weed-<version> (SeaweedFS's `weed`, Apache-2.0), for the object-store tests.
#
# The tests run a real S3 server (`weed server -s3`, conditional writes included) rather than an in-process mock.
# SeaweedFS's go.mod carries a `replace` directive, so `go install ...@version` refuses it: a two-line module that
# requires it and repeats the replace builds it instead, from the Go module proxy (modules cached in Go's module
# cache). A binary already in DEST is kept (re-runs only check).
set -euo pipefail
DEST=$(realpath -m "$1"); VERSION=v0.0.0-20261109003541-7506e5f91cd6
bin="$DEST/weed-$VERSION"; [ -x "$bin" ] && { echo "$bin"; exit 0; }
mkdir -p "$DEST"; w=$(mktemp -d); trap 'rm -rf "$w"' EXIT
cd "$w"
cat > go.mod <<MOD
module spadeweed

go 1.26

require github.com/seaweedfs/seaweedfs $VERSION

replace github.com/tyler-smith/go-bip39 => github.com/cosmos/go-bip39 v1.0.0
MOD
cat > tools.go <<'GO'
//go:build tools

package tools

import _ "github.com/seaweedfs/seaweedfs/weed"
GO
GOFLAGS=-mod=mod go mod tidy >/dev/null 2>&1 || true
GOFLAGS=-mod=mod go build -trimpath -ldflags '-s -w' -o "$bin.tmp" github.com/seaweedfs/seaweedfs/weed
mv "$bin.tmp" "$bin"; echo "$bin"
