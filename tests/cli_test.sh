#!/usr/bin/env bash
# CLI checks: every subcommand answers --help; bad input fails with a message
# naming the thing and a non-zero exit; a tiny prepare/train/eval/generate round
# trip works end to end.
# usage: cli_test.sh PATH/TO/sparseflash SCRATCH_DIR
set -uo pipefail
bin=$1
tmp=$2
rm -rf "$tmp"
mkdir -p "$tmp"
failures=0

pass() { echo "ok   $1"; }
fail() { echo "FAIL $1"; failures=$((failures + 1)); }

# expect NAME EXIT_CODE PATTERN -- command...: exit code and output pattern.
expect() {
  local name=$1 code=$2 pattern=$3
  shift 4
  local out rc
  out=$("$@" 2>&1)
  rc=$?
  if [[ $rc -ne $code ]]; then
    fail "$name: exit $rc, expected $code"; echo "$out" | tail -5; return
  fi
  if ! grep -qE -- "$pattern" <<<"$out"; then
    fail "$name: output lacks /$pattern/"; echo "$out" | tail -5; return
  fi
  pass "$name"
}

# --- help
expect "no arguments lists commands" 2 "commands:" -- "$bin"
expect "--help" 0 "train .*prepare|prepare" -- "$bin" --help
for cmd in train eval prepare sample; do
  expect "$cmd --help" 0 "usage: sparseflash $cmd" -- "$bin" "$cmd" --help
  expect "help $cmd" 0 "usage: sparseflash $cmd" -- "$bin" help "$cmd"
done
for cmd in generate convert saap launch; do
  expect "$cmd --help" 0 "usage: sparseflash $cmd" -- "$bin" "$cmd" --help
done
expect "saap needs fit or eval" 1 "expected .saap fit. or .saap eval." -- "$bin" saap
expect "saap fit needs --saap-index" 1 "--saap-index FILE .the index to write. is required" -- \
  "$bin" saap fit --model x
expect "saap fit bad --key-space" 1 "--key-space: expected pre-rope or rope" -- \
  "$bin" saap fit --model x --saap-index "$tmp/i.saap" --key-space sideways
expect "saap fit bad --recency-bands" 1 "recency band edges must ascend strictly" -- \
  "$bin" saap fit --model x --saap-index "$tmp/i.saap" --recency-bands 64,32
expect "saap fit --recency-bands not a number" 1 "--recency-bands: \"soon\" is not a whole number" -- \
  "$bin" saap fit --model x --saap-index "$tmp/i.saap" --recency-bands 32,soon
# saap fit's settings: the saap_fit section of --config, then --set, then the flags.
printf 'saap_fit {\n  partitions: 512\n  classifier_steps: 300\n}\n' >"$tmp/saap.txtpb"
expect "saap fit --config --print-config" 0 "classifier_steps: 300" -- \
  "$bin" saap fit --config "$tmp/saap.txtpb" --print-config
expect "saap fit --set over --config" 0 "partitions: 128" -- \
  "$bin" saap fit --config "$tmp/saap.txtpb" --set saap_fit.partitions=128 --print-config
expect "saap fit flag over --set" 0 "partitions: 64" -- \
  "$bin" saap fit --set saap_fit.partitions=128 --partitions 64 --print-config
expect "saap fit --set outside saap_fit" 1 "saap fit reads the saap_fit section only" -- \
  "$bin" saap fit --set optim.lr=1 --print-config
expect "saap fit bad saap_fit value names the field" 1 "saap_fit.classifier_steps = 0 must be >= 1" -- \
  "$bin" saap fit --set saap_fit.classifier_steps=0 --print-config
printf 'saap_fit { partitions: 0 }\n' >"$tmp/saap_bad.txtpb"
expect "saap fit bad config value names the file line" 1 "saap_bad.txtpb:1: field saap_fit.partitions = 0" -- \
  "$bin" saap fit --config "$tmp/saap_bad.txtpb" --print-config
expect "saap eval refuses --set" 1 "--set, --config and --print-config are options of saap fit" -- \
  "$bin" saap eval --model x --set saap_fit.partitions=1
expect "saap eval refuses --config" 1 "--set, --config and --print-config are options of saap fit" -- \
  "$bin" saap eval --model x --config "$tmp/saap.txtpb"
expect "saap eval bad --top-l" 1 "--top-l: expected positive integers" -- \
  "$bin" saap eval --model x --saap-index "$tmp/i.saap" --top-l 0
expect "eval --attention saap needs an index" 1 "--attention saap needs --saap-index" -- \
  "$bin" eval --model x --text x --attention saap
expect "--saap-index without --attention saap" 1 "used with --attention saap only" -- \
  "$bin" eval --model x --text x --saap-index "$tmp/i.saap"
expect "eval --help shows the --model form" 0 "eval --model PATH" -- "$bin" eval --help
expect "train --help lists presets" 0 "presets: .*cpu_default" -- "$bin" train --help
expect "unknown command" 2 "unknown command 'frobnicate'" -- "$bin" frobnicate
expect "flag of another command" 2 "unknown flag '--prompt'" -- "$bin" train --prompt x

# --- configs
printf 'model {\n  n_layer: 2\n  n_heads: 3\n}\n' >"$tmp/bad_field.txtpb"
expect "unknown config field names file, line, field" 1 "bad_field.txtpb:3:.*n_heads" -- \
  "$bin" train --config "$tmp/bad_field.txtpb"
printf 'model {\n  n_head: 5\n  d_model: 128\n}\n' >"$tmp/bad_value.txtpb"
expect "invalid config value names field and line" 1 "bad_value.txtpb:2.*model.n_head" -- \
  "$bin" train --config "$tmp/bad_value.txtpb"
expect "missing config file" 1 "nope.txtpb" -- "$bin" train --config "$tmp/nope.txtpb"
expect "bad override" 1 "optim.lrr" -- "$bin" train --set optim.lrr=1
expect "print-config applies overrides" 0 "lr: 0.00042" -- \
  "$bin" train --config preset:tiny_test --set optim.lr=0.00042 --print-config

# --- data
mkdir -p "$tmp/text/sub"
for i in $(seq 1 30); do
  for j in $(seq 1 40); do echo "line $j of document $i: the quick brown fox $((i * j))"; done \
    >"$tmp/text/sub/doc$i.txt"
done
expect "prepare" 0 "wrote .*train [0-9]+ documents" -- \
  "$bin" prepare "$tmp/text" --out "$tmp/data" --val-fraction 0.2
expect "prepare without input" 1 "no input" -- "$bin" prepare --out "$tmp/data2"
expect "prepare missing input" 1 "does-not-exist" -- "$bin" prepare "$tmp/does-not-exist" --out "$tmp/data3"

# --- train, eval, sample
common=(--config preset:tiny_test --set "data.dir=$tmp/data" --set "checkpoint.out_dir=$tmp/run"
        --set train.max_steps=6 --set eval.sample_tokens=8)
expect "train tiny" 0 "final: step 6" -- "$bin" train "${common[@]}"
expect "train resumes finished run" 0 "resumed from .* at step 6" -- "$bin" train "${common[@]}"
expect "eval --json" 0 '"bits_per_byte"' -- "$bin" eval --checkpoint "$tmp/run" --batches 2 --json
expect "sample" 0 "^hello" -- "$bin" sample --checkpoint "$tmp/run" --prompt hello --tokens 5
expect "sample missing checkpoint" 1 "does not exist" -- "$bin" sample --checkpoint "$tmp/none.pt"
# eval and generate take any model: a GPT run through --model (the old spellings still work,
# with a deprecation note).
expect "eval --model RUN: validation loss" 0 '"bits_per_byte"' -- "$bin" eval --model "$tmp/run" --batches 2 --json
expect "eval --checkpoint is deprecated" 0 "deprecated: use sparseflash eval --model" -- \
  "$bin" eval --checkpoint "$tmp/run" --batches 2
expect "eval --model RUN --text: perplexity of a GPT run" 0 "perplexity: " -- \
  "$bin" eval --model "$tmp/run" --text "$tmp/text/sub/doc1.txt" --context 32 --max-tokens 200
expect "generate --model GPT run" 0 "^hello" -- \
  "$bin" generate --model "$tmp/run" --prompt hello --max-new-tokens 5
expect "generate --model GPT run --json" 0 '"prompt_ids":\[104,' -- \
  "$bin" generate --model "$tmp/run" --prompt hello --max-new-tokens 5 --json
expect "sample is deprecated" 0 "deprecated: use sparseflash generate --model" -- \
  "$bin" sample --checkpoint "$tmp/run" --prompt hello --tokens 5
expect "generate --model GPT run --attention dense" 0 "dense attention" -- \
  "$bin" generate --model "$tmp/run" --prompt hello --max-new-tokens 3 --attention dense
expect "byte data records the byte tokenizer" 0 '"tokenizer_source": "byte"' -- cat "$tmp/data/meta.json"

# --- prepare with a tokenizer file: a byte-level BPE tokenizer.json of printable ASCII,
# space (Ġ) and newline (Ċ), "the" merged, <|endoftext|> its EOS (tokenizer_config.json).
write_tokenizer() {  # DIR EOS_TOKEN
  local dir=$1 vocab="" id=0 c code
  mkdir -p "$dir"
  for code in $(seq 33 126); do
    c=$(printf "\\$(printf %03o "$code")")
    [[ $c == '"' || $c == '\' ]] && c="\\$c"
    vocab+="\"$c\": $id, "
    id=$((id + 1))
  done
  vocab+="\"Ġ\": $id, \"Ċ\": $((id + 1)), \"th\": $((id + 2)), \"the\": $((id + 3))"
  cat >"$dir/tokenizer.json" <<JSON
{"normalizer": null, "post_processor": null,
 "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true},
 "decoder": {"type": "ByteLevel"},
 "added_tokens": [{"id": $((id + 4)), "content": "<|endoftext|>", "special": true}],
 "model": {"type": "BPE", "vocab": {$vocab}, "merges": ["t h", "th e"]}}
JSON
  [[ -n $2 ]] && printf '{"eos_token": "%s"}\n' "$2" >"$dir/tokenizer_config.json"
  return 0
}
write_tokenizer "$tmp/tok" "<|endoftext|>"
expect "prepare --tokenizer tokenizer.json" 0 "wrote .*tokenizer bpe:99:fnv1a64:[0-9a-f]{16} \\(vocabulary 99\\)" -- \
  "$bin" prepare "$tmp/text" --out "$tmp/data_bpe" --val-fraction 0.2 --tokenizer "$tmp/tok"
expect "meta.json names the tokenizer file" 0 "\"tokenizer_source\": \"$tmp/tok\"" -- cat "$tmp/data_bpe/meta.json"
expect "meta.json: separator = the EOS" 0 '"document_separator": 98' -- cat "$tmp/data_bpe/meta.json"
expect "prepare --join-dir: one document per directory" 0 \
  "wrote .*(train 1 documents.*val 0 documents|train 0 documents.*val 1 documents)" -- \
  "$bin" prepare "$tmp/text" --out "$tmp/data_joined" --join-dir --tokenizer "$tmp/tok"
expect "prepare missing tokenizer file" 1 "nope.json" -- \
  "$bin" prepare "$tmp/text" --out "$tmp/data4" --tokenizer "$tmp/nope.json"
write_tokenizer "$tmp/tok_no_eos" ""
expect "prepare: a tokenizer without EOS needs a separator" 1 "--document-separator" -- \
  "$bin" prepare "$tmp/text" --out "$tmp/data5" --tokenizer "$tmp/tok_no_eos"
expect "prepare --document-separator" 0 "wrote " -- \
  "$bin" prepare "$tmp/text" --out "$tmp/data5" --tokenizer "$tmp/tok_no_eos" --document-separator 98
expect "prepare --add-bos with byte is refused" 1 "add_bos" -- \
  "$bin" prepare "$tmp/text" --out "$tmp/data6" --add-bos
bpe=(--config preset:tiny_test --set "data.dir=$tmp/data_bpe" --set "checkpoint.out_dir=$tmp/run_bpe"
     --set train.max_steps=3 --set eval.sample_tokens=8)
expect "train on BPE data" 0 "final: step 3" -- "$bin" train "${bpe[@]}"
expect "sample with the data's tokenizer" 0 "^the" -- "$bin" sample --checkpoint "$tmp/run_bpe" --prompt the --tokens 5
expect "generate with the data's tokenizer" 0 "^the" -- \
  "$bin" generate --model "$tmp/run_bpe" --prompt the --max-new-tokens 5
write_tokenizer "$tmp/tok" "!"
expect "train refuses a tokenizer changed since prepare" 1 "changed since" -- \
  "$bin" train "${bpe[@]}" --set "checkpoint.out_dir=$tmp/run_bpe2"
expect "sample refuses a tokenizer changed since prepare" 1 "changed since" -- \
  "$bin" sample --checkpoint "$tmp/run_bpe" --prompt the --tokens 5
expect "generate refuses a tokenizer changed since prepare" 1 "changed since" -- \
  "$bin" generate --model "$tmp/run_bpe" --prompt the --max-new-tokens 5

# --- pretrained-model commands: bad input is named (tests/llama_test.cc runs real models)
expect "eval --model missing file" 1 "none.gguf does not exist" -- \
  "$bin" eval --model "$tmp/none.gguf" --text "$tmp/text/sub/doc1.txt"
expect "eval --model needs --text or --data" 1 "exactly one of --text" -- "$bin" eval --model "$tmp/none.gguf"
expect "eval --model bad stride" 1 "--stride must be in" -- \
  "$bin" eval --model "$tmp/none.gguf" --text x --context 16 --stride 32
expect "eval --model not a checkpoint" 1 "doc1.txt" -- \
  "$bin" eval --model "$tmp/text/sub/doc1.txt" --text "$tmp/text/sub/doc1.txt"
expect "generate needs --model" 1 "--model is required" -- "$bin" generate --prompt hi
expect "generate bad top-p" 1 "--top-p must be in" -- "$bin" generate --model x --top-p 0
expect "convert needs --input" 1 "--input is required" -- "$bin" convert --output "$tmp/conv"
expect "convert --to unknown" 1 "expected native, gguf or hf-gpt2" -- \
  "$bin" convert --input "$tmp/run" --output "$tmp/conv" --to onnx
expect "convert GPT run to HF GPT-2 says it was sparse" 0 "trained with sparse attention" -- \
  "$bin" convert --to hf-gpt2 --input "$tmp/run" --output "$tmp/run_hf"
expect "convert a GPT run as a Llama points to hf-gpt2" 1 "export it with --to hf-gpt2" -- \
  "$bin" convert --input "$tmp/run" --output "$tmp/conv"
expect "convert a GPT run to GGUF points to hf-gpt2" 1 "export it with --to hf-gpt2" -- \
  "$bin" convert --input "$tmp/run" --output "$tmp/conv.gguf"
expect "convert --gguf-type unknown" 1 "expected f32, f16, bf16 or q8_0" -- \
  "$bin" convert --input "$tmp/run" --output "$tmp/conv.gguf" --gguf-type q4_k
expect "resume into another architecture" 1 "model.n_layer" -- \
  "$bin" train "${common[@]}" --set model.n_layer=3

# A shard with a wrong magic and a truncated one are named in the error.
cp -r "$tmp/data" "$tmp/data_bad"
shard=$(ls "$tmp/data_bad"/train_*.bin | head -1)
printf 'XXXXXXXX' | dd of="$shard" conv=notrunc status=none
expect "wrong shard magic" 1 "$(basename "$shard").*magic" -- \
  "$bin" train "${common[@]}" --set "data.dir=$tmp/data_bad" --set "checkpoint.out_dir=$tmp/run_bad"
cp -r "$tmp/data" "$tmp/data_cut"
shard=$(ls "$tmp/data_cut"/train_*.bin | head -1)
truncate -s 1000 "$shard"
expect "truncated shard" 1 "truncated" -- \
  "$bin" train "${common[@]}" --set "data.dir=$tmp/data_cut" --set "checkpoint.out_dir=$tmp/run_cut"

# SIGINT during training writes a checkpoint and exits 128+2.
"$bin" train --config preset:tiny_test --set "data.dir=$tmp/data" --set "checkpoint.out_dir=$tmp/run_int" \
  --set train.max_steps=100000 --set eval.interval=0 --set checkpoint.interval=0 >"$tmp/int.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do grep -q "step 10/" "$tmp/int.log" && break; sleep 0.2; done
kill -INT $pid
wait $pid
rc=$?
if [[ $rc -eq 130 && -f "$tmp/run_int/ckpt.pt" ]] && grep -q "checkpoint written" "$tmp/int.log"; then
  pass "SIGINT writes a checkpoint and exits 130"
else
  fail "SIGINT: exit $rc"; tail -3 "$tmp/int.log"
fi

echo "$failures failure(s)"
[[ $failures -eq 0 ]]
