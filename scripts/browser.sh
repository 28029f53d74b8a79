#!/usr/bin/env bash
# Debian's chromium, for the tests that open report.html in a real headless browser.
#   scripts/browser.sh install    # apt-get install chromium (root), if it is missing
#   scripts/browser.sh path       # print the browser's path
set -euo pipefail
find_browser() { command -v chromium || command -v chromium-browser || command -v google-chrome || true; }
case "${1:-install}" in
  install)
    if [ -z "$(find_browser)" ]; then
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq
      apt-get install -y -qq chromium >/dev/null
    fi
    echo "browser: $(find_browser) ($("$(find_browser)" --version 2>/dev/null || echo unknown))"
    ;;
  path) find_browser ;;
  *) echo "usage: $0 install|path" >&2; exit 2 ;;
esac
