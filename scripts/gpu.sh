#!/usr/bin/env bash
# scripts/gpu.sh: the one entry point for work on the GPU host. Run from the
# repository root on the host (results under OUT, default ./gpu-out):
#
#   bash scripts/gpu.sh TASK [ARGS...]
#
# Tasks (each names the script that does it; their environment variables are
# documented at the top of that script):
#   build [TARGET...]    unpack .deps, configure build-gpu (sm_90a), build TARGETs
#                        (default: everything); "label:L" = the test programs of label L
#   test [LABEL]         build the test programs of ctest label LABEL (default gpu:
#                        every program with GPU cases) and run `ctest -L LABEL`;
#                        labels: gpu, kernels, saap, slow, cpu (tests/CMakeLists.txt)
#   kernels              kernel tests and bench_attention vs SDPA   (gpu_kernels.sh)
#   kernel-times         every kernel's time under Nsight Compute   (gpu_kernel_times.sh)
#   profile              Nsight profile of one attention case       (gpu_profile.sh)
#   step                 the GPT training step vs PyTorch           (gpu_train_step.sh)
#   quality-8k           200-step validation loss of each mode      (gpu_quality_8k.sh)
#   experiment lm|long-context [PHASE...]  issue 21's / 20's experiment (gpu_experiment.sh)
#   llama                SmolLM2 against transformers               (gpu_llama.sh)
#   llama-step           the long-context Llama step vs PyTorch     (gpu_llama_step.sh)
#   llama-finetune       Llama fine-tuning steps                    (gpu_llama_finetune.sh)
#   long-finetune        long-context fine-tuning runs              (gpu_long_finetune.sh)
#   saap | saap-attention | saap-decode | saap-llama   SAAP checks  (gpu_saap*.sh)
#   distributed          data parallel on a multi-GPU host          (gpu_distributed.sh)
#   wgmma-probe          the Hopper wgmma building blocks           (gpu_wgmma_probe.sh)
#   host [PHASE...]      scripts/gpu_host.sh's phases (deps configure build ctest
#                        prepare train bench train8k)
#   list                 this list
#
# Every task script starts from scripts/gpu_env.sh (repository root, OUT, the
# unpacked libraries on LD_LIBRARY_PATH, gpu_logs). Inputs the host lacks travel
# with the device call (carry): .deps always
# (scripts/staging/fetch_gpu_debs.sh), data/tokenizers for the LM experiment, model
# pieces for the Llama tasks (scripts/staging/fetch_gpu_llama.sh, scripts/staging/stage_smollm2.sh).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

usage() { sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

task=${1:-}
[ $# -gt 0 ] && shift
run() { exec bash "scripts/$1" "${@:2}"; }
case $task in
  build)
    GPU_PHASES="deps configure build" GPU_BUILD_TARGETS="${*:-${GPU_BUILD_TARGETS:-}}" \
      run gpu_host.sh ;;
  test)
    label=${1:-gpu}
    # Configure first: the label's program list is written by CMake.
    GPU_PHASES="deps configure" bash scripts/gpu_host.sh >/dev/null || {
      echo "gpu.sh: configure failed (run: bash scripts/gpu.sh host configure)" >&2; exit 1; }
    # A build tree configured by an older checkout lacks the list: regenerate it.
    [ -f "build-gpu/tests/targets-$label.txt" ] || cmake build-gpu >/dev/null ||
      { echo "gpu.sh: cmake build-gpu failed" >&2; exit 1; }
    [ -f "build-gpu/tests/targets-$label.txt" ] || {
      echo "gpu.sh: no test label '$label' (labels: gpu kernels saap slow cpu)" >&2; exit 2; }
    GPU_PHASES="deps build ctest" GPU_BUILD_TARGETS="label:$label" CTEST_LABEL="$label" \
      run gpu_host.sh ;;
  kernels) run gpu_kernels.sh "$@" ;;
  kernel-times) run gpu_kernel_times.sh "$@" ;;
  profile) run gpu_profile.sh "$@" ;;
  step) run gpu_train_step.sh "$@" ;;
  quality-8k) run gpu_quality_8k.sh "$@" ;;
  experiment)
    kind=${1:-}
    [ $# -gt 0 ] && shift
    case $kind in
      lm|long-context) EXPERIMENT=$kind run gpu_experiment.sh "$@" ;;
      *) echo "gpu.sh: experiment lm or experiment long-context" >&2; exit 2 ;;
    esac ;;
  llama) run gpu_llama.sh "$@" ;;
  llama-step) run gpu_llama_step.sh "$@" ;;
  llama-finetune) run gpu_llama_finetune.sh "$@" ;;
  long-finetune) run gpu_long_finetune.sh "$@" ;;
  saap) run gpu_saap.sh "$@" ;;
  saap-attention) run gpu_saap_attention.sh "$@" ;;
  saap-decode) run gpu_saap_decode.sh "$@" ;;
  saap-llama) run gpu_saap_llama.sh "$@" ;;
  distributed) run gpu_distributed.sh "$@" ;;
  wgmma-probe) run gpu_wgmma_probe.sh "$@" ;;
  host) GPU_PHASES="${*:-${GPU_PHASES:-}}" run gpu_host.sh ;;
  list|-h|--help|help) usage ;;
  "") usage >&2; exit 2 ;;
  *) echo "gpu.sh: unknown task '$task'" >&2; usage >&2; exit 2 ;;
esac
