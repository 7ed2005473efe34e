#!/usr/bin/env bash
# scripts/gpu_long_context.sh: issue 20's experiment on the GPU host, as the
# commands in docs/finetune.md run it: scripts/gpu_experiment.sh with
# EXPERIMENT=long-context (see there).
exec env EXPERIMENT=long-context bash "$(dirname "${BASH_SOURCE[0]}")/gpu_experiment.sh" "$@"
