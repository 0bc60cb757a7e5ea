#!/usr/bin/env bash
# Installs the Debian packages the tests need, once: headless Chromium drives the dashboard test,
# docker-compose validates docker-compose.yml (`docker-compose config` needs no Docker engine).
set -euo pipefail
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != 0 ]; then SUDO=sudo; else SUDO=; fi
echo "installing ${missing[*]} (dashboard browser test, compose file check)..."
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
