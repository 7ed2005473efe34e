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
[ -x "$SF" ] || [ "$PHASES" = report ] || die "no binary at $SF (build it, or set SF)"
