#!/usr/bin/env bash
# The 2-bit table on the accelerator machine (MLX's CUDA backend), after the carry calls that
# ../shared/tools/device-pack prints (the default model's GGUF packed as an extra file, the
# WikiText files carried in .dev/data). A call may run 10 minutes at most, so the benchmark runs
# detached and each call waits and reports:
#     bash benchmarks/accelerator.sh start ROWS-AND-OPTIONS...   # unpack, start, wait, report
#     bash benchmarks/accelerator.sh wait SECONDS                # wait, report
# Results: /tmp/res/gpu.json (copied to $OUT with the prompts after each call).
set -u
R=/tmp/res
report() {
  tail -n 40 "$R/log"
  [ -n "${OUT:-}" ] && cp "$R"/gpu.json "$R"/log "$OUT"/ 2>/dev/null
  [ -n "${OUT:-}" ] && cp "$R"/gpu/*prompts.json "$R"/gpu/*.json "$OUT"/ 2>/dev/null
  pgrep -f two_bit.py >/dev/null && echo "(still running)" || echo "(finished)"
}
waitfor() {  # wait up to $1 seconds, less if the run ends
  local end=$((SECONDS + $1))
  while [ $SECONDS -lt $end ] && pgrep -f two_bit.py >/dev/null; do sleep 5; done
}
case "${1:-}" in
start)
  shift
  mkdir -p /tmp/dev "$R" && cp .dev/c4/part.* /tmp/dev/ && . .dev/c4/device-unpack || exit 1
  export DUPSTUDIO_DEFAULT_GGUF=/tmp/dev/x/SmolLM2-135M-Instruct.Q4_1.gguf DUPSTUDIO_DATA=$PWD/.dev/data \
         DUPSTUDIO_HOME=/tmp/dh PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  setsid nohup python3 benchmarks/two_bit.py "$@" --device "$(nvidia-smi --query-gpu=name --format=csv,noheader) (accelerator, MLX CUDA)" \
    --out "$R/gpu.json" >"$R/log" 2>&1 < /dev/null &
  waitfor "${WAIT:-540}"; report ;;
wait)
  waitfor "${2:-560}"; report ;;
*) echo "usage: $0 start ROWS... | wait SECONDS" >&2; exit 2 ;;
esac
