# scripts/staging/stage_smollm2.sh: sourced by the GPU-host scripts that need
# SmolLM2-135M-Instruct (scripts/gpu_llama.sh, scripts/gpu_saap_llama.sh).
# A device call carries at most 64 MiB, so scripts/staging/fetch_gpu_llama.sh splits the
# 98 MB GGUF into .deps-gguf/part1 and part2; they travel in two calls and are
# joined in build-gpu/llama/, which stays on the host while it is warm:
#   call 1: carry .deps-gguf/part1             (stages part 1, exits 3)
#   call 2: carry .deps and .deps-gguf/part2   (joins, then the script runs)
# stage_smollm2 sets GGUF to the joined file and returns 0, or returns 3 when a
# half is still missing (after saying which), or 1 when the checksum is wrong.
STAGE=build-gpu/llama
GGUF=$STAGE/SmolLM2-135M-Instruct.Q4_1.gguf

stage_smollm2() {
  mkdir -p "$STAGE"
  local want_sha have_sha missing p
  want_sha=$(cat .deps/llama/SmolLM2.sha256 2>/dev/null || true)
  if [ ! -f "$GGUF" ]; then
    for p in part1 part2; do
      if [ -f ".deps-gguf/$p" ]; then cp ".deps-gguf/$p" "$STAGE/$p" && echo "staged $p"; fi
    done
    if [ -f "$STAGE/part1" ] && [ -f "$STAGE/part2" ]; then
      cat "$STAGE/part1" "$STAGE/part2" >"$GGUF.tmp" && mv "$GGUF.tmp" "$GGUF" &&
        rm -f "$STAGE/part1" "$STAGE/part2"
      echo "joined $GGUF"
    else
      missing=$(for p in part1 part2; do [ -f "$STAGE/$p" ] || printf '%s ' ".deps-gguf/$p"; done)
      echo "the model is not complete on this host yet; carry ${missing}in the next call" \
           "(with .deps)" >&2
      return 3
    fi
  fi
  if [ -z "$want_sha" ]; then
    echo ".deps/llama/SmolLM2.sha256 missing: carry .deps (scripts/staging/fetch_gpu_llama.sh)" >&2
    return 1
  fi
  have_sha=$(sha256sum "$GGUF" | awk '{print $1}')
  if [ "$have_sha" != "$want_sha" ]; then
    rm -f "$GGUF"
    echo "$GGUF has sha256 $have_sha, expected $want_sha (removed; carry both halves again)" >&2
    return 1
  fi
}
