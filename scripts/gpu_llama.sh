#!/usr/bin/env bash
# scripts/gpu_llama.sh: on the GPU host, SmolLM2-135M-Instruct (GGUF Q4_1) with
# `sparseflash eval` and with transformers on the same GPU, text and windows:
# perplexity and tokens/s side by side (bf16, dense attention, context 8192), plus
# 64 greedy tokens from both (float32) compared token by token. Prints a table last;
# JSON and logs go to $OUT.
#
# Inputs (made on the development machine by scripts/staging/fetch_gpu_llama.sh; git-ignored,
# so they must be carried):
#   .deps/          (the Debian packages gpu_host.sh unpacks, and .deps/llama/: the text,
#                    the gguf wheel, the model's checksum)
#   .deps-gguf/part1, .deps-gguf/part2   the GGUF in halves (a call carries <= 64 MiB).
# The halves are joined in build-gpu/llama/, which stays on the host between calls,
# so two calls do it:
#   call 1: carry .deps-gguf/part1               (stages part 1, exits 3)
#   call 2: carry .deps and .deps-gguf/part2     (joins, builds, runs)
# A later call on the same host needs only .deps (the model is there already).
#
# Environment: OUT (default ./gpu-out), LLAMA_CONTEXT (8192), LLAMA_STRIDE (4096),
# LLAMA_GREEDY (64).
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"
ME=scripts/gpu_llama.sh
die() { printf '%s: error: %s\n' "$ME" "$*" >&2; exit 1; }

TEXT=.deps/llama/linux_docs.txt
BIN=build-gpu/cli/sparseflash
CONTEXT=${LLAMA_CONTEXT:-8192}
STRIDE=${LLAMA_STRIDE:-4096}
GREEDY=${LLAMA_GREEDY:-64}
PROMPT="The Linux kernel's memory management subsystem"

# --- the model: stage the halves, join them once both are here
# shellcheck source=scripts/staging/stage_smollm2.sh
. scripts/staging/stage_smollm2.sh
stage_smollm2 || exit $?
[ -f "$TEXT" ] || die "$TEXT missing: carry .deps (scripts/staging/fetch_gpu_llama.sh)"

# --- transformers needs the gguf package to read the file
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/sf-llama-site .deps/llama/gguf-*.whl || die "cannot install the gguf wheel"
export PYTHONPATH=/tmp/sf-llama-site${PYTHONPATH:+:$PYTHONPATH}

# --- build sparseflash (configure once; ninja rebuilds only what changed)
GPU_PHASES="configure build" GPU_BUILD_TARGETS=sparseflash OUT=/tmp/sf-llama-host \
  scripts/gpu_host.sh >/tmp/sf-llama-host.log 2>&1 ||
  { tail -n 40 /tmp/sf-llama-host.log; die "build failed (log above)"; }
echo "[${SECONDS}s] built $BIN"

# --- ours
"$BIN" eval --model "$GGUF" --text "$TEXT" --context "$CONTEXT" --stride "$STRIDE" \
    --dtype bfloat16 --attention dense --device cuda --json-file "$OUT/ours_eval.json" \
    >"$OUT/ours_eval.log" 2>&1 || { tail -n 20 "$OUT/ours_eval.log"; die "sparseflash eval failed"; }
tail -n 4 "$OUT/ours_eval.log"
echo "[${SECONDS}s] sparseflash eval done"
"$BIN" generate --model "$GGUF" --prompt "$PROMPT" --max-new-tokens "$GREEDY" --temperature 0 \
    --dtype float32 --device cuda --json --json-file "$OUT/ours_generate.json" \
    >/dev/null 2>"$OUT/ours_generate.log" ||
  { tail -n 20 "$OUT/ours_generate.log"; die "sparseflash generate failed"; }
echo "[${SECONDS}s] sparseflash generate done"

# --- transformers
python3 tests/python/llama_hf_eval.py --gguf "$GGUF" --text "$TEXT" --context "$CONTEXT" \
    --stride "$STRIDE" --dtype bfloat16 --device cuda --json "$OUT/transformers.json" \
    --prompt "$PROMPT" --greedy "$GREEDY" --greedy-dtype float32 >"$OUT/transformers.log" 2>&1 ||
  { tail -n 30 "$OUT/transformers.log"; die "transformers side failed"; }
echo "[${SECONDS}s] transformers done"

# --- table
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
ours = json.load(open(f"{out}/ours_eval.json"))
hf = json.load(open(f"{out}/transformers.json"))
gen = json.load(open(f"{out}/ours_generate.json"))
ref = hf["greedy"]
n = min(len(gen["ids"]), len(ref["ids"]))
first_diff = next((i for i in range(n) if gen["ids"][i] != ref["ids"][i]), None)
same = gen["prompt_ids"] == ref["prompt_ids"] and gen["ids"] == ref["ids"]
summary = {
    "context": ours["context"], "stride": ours["stride"], "device": hf["device"],
    "tokens": {"sparseflash": ours["tokens"], "transformers": hf["tokens"]},
    "perplexity": {"sparseflash": ours["perplexity"], "transformers": hf["perplexity"]},
    "perplexity_rel_diff": ours["perplexity"] / hf["perplexity"] - 1,
    "tokens_per_second": {"sparseflash": ours["tokens_per_second"],
                          "transformers": hf["tokens_per_second"]},
    "speedup": ours["tokens_per_second"] / hf["tokens_per_second"],
    "greedy": {"tokens": len(gen["ids"]), "identical": same, "first_difference": first_diff,
               "prompt_ids_identical": gen["prompt_ids"] == ref["prompt_ids"]},
}
json.dump(summary, open(f"{out}/llama_summary.json", "w"), indent=2)
print(f"\nSmolLM2-135M-Instruct Q4_1, {hf['device']}, {ours['dtype']}, {ours['attention']} attention, "
      f"context {ours['context']}, stride {ours['stride']}")
print(f"{'':14}{'tokens':>9}{'perplexity':>12}{'tokens/s':>11}{'seconds':>9}")
for name, r in (("sparseflash", ours), ("transformers", hf)):
    print(f"{name:14}{r['tokens']:>9}{r['perplexity']:>12.4f}{r['tokens_per_second']:>11.0f}"
          f"{r['seconds']:>9.2f}")
print(f"perplexity difference {100 * summary['perplexity_rel_diff']:+.3f}% (bound 0.5%), "
      f"speed ratio {summary['speedup']:.2f}x (bound >= 1)")
print(f"greedy float32, {len(gen['ids'])} vs {len(ref['ids'])} tokens: "
      + ("identical" if same else f"DIFFER (first at {first_diff}; prompt ids equal: "
                                  f"{gen['prompt_ids'] == ref['prompt_ids']})"))
ok = abs(summary["perplexity_rel_diff"]) <= 0.005 and summary["speedup"] >= 1 and same
print("acceptance:", "met" if ok else "NOT met")
PY
