#!/usr/bin/env bash
# Debian's Chromium for the dashboard's browser test (driven by Playwright with
# executable_path; `playwright install` is never used). Idempotent: does nothing when it is
# there. Fails loudly when it cannot install it, so the test never silently skips.
set -euo pipefail
CHROMIUM="${KILN_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-browser: $CHROMIUM is missing and apt-get is not available; install Chromium and set KILN_CHROMIUM" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
echo "install-browser: installing Debian's chromium" >&2
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
if [ ! -x "$CHROMIUM" ]; then
    echo "install-browser: chromium installed but $CHROMIUM is still missing" >&2
    exit 1
fi
