# scripts/experiment_lib.sh: what the resumable experiment scripts
# (lm_experiment.sh, long_context_experiment.sh) share; sourced, not run.
# The sourcing script sets ME (its name for messages), DEADLINE (seconds, 0 =
# none), SF (the sparseflash binary) and PHASES before sourcing, and starts
# SECONDS at 0.

log() { echo "[$(date +%H:%M:%S) +${SECONDS}s] $*"; }
die() { echo "$ME: $*" >&2; exit 1; }
# past_deadline: true (and says so once) when DEADLINE is set and reached.
past_deadline() {
  [ "$DEADLINE" -gt 0 ] && [ "$SECONDS" -ge "$DEADLINE" ] || return 1
  [ -n "${said_deadline:-}" ] || log "deadline of ${DEADLINE}s reached: run again to go on"
  said_deadline=1
}
# prepare_data TOKENIZER WHAT: the data phase's corpus, unless DATA holds one:
# the files of SOURCE (default: python3's site-packages) matching INCLUDE, one
# document per directory, documents under MIN_DOC_TOKENS dropped, VAL_FRACTION
# of the directories held out, tokenized with TOKENIZER (WHAT names it in the
# log); PREPARE_ARGS adds prepare flags. Copies meta.json to EXP/results.
prepare_data() {
  if [ ! -s "$DATA/meta.json" ]; then
    local src=${SOURCE:-$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')}
    log "data: $src ($INCLUDE, one document per directory, >= $MIN_DOC_TOKENS tokens) $2"
    # shellcheck disable=SC2086
    "$SF" prepare "$src" --out "$DATA" --include "$INCLUDE" --join-dir --tokenizer "$1" \
      --val-fraction "$VAL_FRACTION" --min-document-tokens "$MIN_DOC_TOKENS" ${PREPARE_ARGS:-} \
      >"$EXP/logs/prepare.log" 2>&1 || die "prepare failed: $(tail -3 "$EXP/logs/prepare.log")"
    tail -1 "$EXP/logs/prepare.log"
  fi
  cp "$DATA/meta.json" "$EXP/results/data-meta.json"
}
# train_exit RC NAME: a training run's exit status RC as the phase reads it:
# 0 done; 2 stopped at the deadline (SIGTERM or timeout; a checkpoint was
# written, the next call resumes); 1 failed (the log's last lines shown).
train_exit() {
  if [ "$1" -eq 143 ] || [ "$1" -eq 124 ]; then
    log "  stopped at the deadline (checkpoint written): run again to resume"
    return 2
  fi
  [ "$1" -eq 0 ] || { log "  failed (exit $1): $(tail -2 "$EXP/logs/$2-train.log")"; return 1; }
}
[ -x "$SF" ] || [ "$PHASES" = report ] || die "no binary at $SF (build it, or set SF)"
