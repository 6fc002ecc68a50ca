"""Container health probe: `python -m service.healthcheck` exits 0 when /health/ready answers 200 on this host's
DUALRATE_PORT (default 8000), else 1. Used by the Dockerfile's HEALTHCHECK and docker-compose."""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    url = f"http://127.0.0.1:{os.environ.get('DUALRATE_PORT', '8000')}/health/ready"
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return 0 if r.status == 200 else 1
    except (urllib.error.URLError, OSError) as e:
        print(f"not ready: {url}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
