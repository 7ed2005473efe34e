#!/usr/bin/env bash
# scripts/staging/fetch_gpu_debs.sh: download, on the development machine (Debian 12), the
# .deb files the offline GPU host lacks into .deps/, for scripts/gpu_host.sh to
# unpack there. .deps/ is git-ignored: carry it to the host explicitly.
#
# Usage: scripts/staging/fetch_gpu_debs.sh [EXTRA_PACKAGE...]
#   Extra packages are fetched too, e.g. a library that gpu_host.sh's deps phase
#   reports missing on the host (libxml2, ...).
# Files already in .deps/ are not downloaded again; delete .deps/ to refresh.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."

ME=scripts/staging/fetch_gpu_debs.sh
die() { printf '%s: error: %s\n' "$ME" "$*" >&2; exit 1; }

# Abseil, libarchive, RE2 and ISA-L (CRC-32C of TensorBoard's event records),
# headers + CMake/pkg-config files (-dev) and the shared libraries they link to.
# Nothing else: the host has the rest.
PACKAGES=(libabsl-dev libabsl20220623 libarchive-dev libarchive13 libre2-dev libre2-9
          libisal-dev libisal2 "$@")

command -v apt-get >/dev/null 2>&1 ||
  die "apt-get is not available; this runs on the Debian 12 development machine"

# As root, apt would download as the user _apt, who cannot write here, and warn;
# downloading as root instead is what it falls back to anyway.
SANDBOX=()
if [ "$(id -u)" -eq 0 ]; then SANDBOX=(-o APT::Sandbox::User=root); fi

mkdir -p .deps
cd .deps
for p in "${PACKAGES[@]}"; do
  # Files are named PACKAGE_VERSION_ARCH.deb.
  if compgen -G "${p}_*.deb" >/dev/null; then
    echo "have     $(compgen -G "${p}_*.deb" | head -n 1)"
    continue
  fi
  echo "download $p"
  apt-get "${SANDBOX[@]}" download "$p" ||
    die "apt-get download $p failed; if apt cannot locate it, run apt-get update (as root) and retry"
done

debs=(./*.deb)
echo "$(du -sh . | cut -f1) in .deps/ (${#debs[@]} files)"
