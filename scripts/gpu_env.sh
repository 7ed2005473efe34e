# shellcheck shell=bash
# scripts/gpu_env.sh: the environment every scripts/gpu_*.sh task shares on the
# GPU host; sourced (first thing) by each of them, not run. After it:
#   - bash runs with -u and pipefail; the working directory is the repository root;
#   - OUT (default ./gpu-out) exists and is an absolute path: what the device
#     tool brings back;
#   - LD_LIBRARY_PATH starts with the libraries that scripts/gpu_host.sh unpacks
#     from .deps/ into /opt/deps (Abseil, libarchive: the host has no copies);
#   - SECONDS counts from here;
#   - gpu_logs NAME: LOGS is a new temporary folder, packed into $OUT/NAME.tgz when
#     the script exits (the device tool returns at most 8 files: logs go as one).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
SECONDS=0
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export LD_LIBRARY_PATH=/opt/deps/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

gpu_logs() {
  LOGS=$(mktemp -d "/tmp/gpu-$1.XXXX")
  # shellcheck disable=SC2064  # expand now: OUT and the name are fixed
  trap "tar czf '$OUT/$1.tgz' -C '$LOGS' . 2>/dev/null" EXIT
}
