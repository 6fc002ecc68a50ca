#!/usr/bin/env bash
# Installs the system tools the test suite uses (a real Prometheus, promtool) where they are missing.
set -euo pipefail
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
        echo "installing Debian's prometheus package (prometheus + promtool) for the metrics tests"
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
        # The package may start a system service; the tests run their own instance.
        (service prometheus stop || systemctl stop prometheus || pkill -x prometheus) >/dev/null 2>&1 || true
    else
        echo "prometheus/promtool not found and cannot apt-get install: those tests will be skipped" >&2
    fi
fi
