#!/usr/bin/env bash
# The one-call GPU check (issue 24; docs/benchmarks.md "GPU check"), ~8 minutes on one H100/H200:
#   bash scripts/gpu_check.sh OUT [--quick] [--cpu-dry-run] [--wheels DIR]
# Stages (scripts/gpu_check/<stage>.py), each in its own time box, each writing OUT/<stage>.json
# as its results arrive, so one stage failing or hanging costs only its own box:
#   install     missing wheels from DIR (default ../shared/wheels beside the repo, or .whl/ in it)
#   gpu_tests   the `gpu`-marked pytest tests
#   bf16_curve  one GPU, bf16: 8 steps against the CPU fp32 run of the same config
#   parity      4 ranks on the one GPU over gloo, fp32: sp=4, sp=4 ring=2, sliding window, head
#               groups, each against one rank
#   speed       tokens/s against transformers at 8k/32k/64k/128k (--quick: 8k, 32k) and the
#               planner's predicted peak per row
# then OUT/summary.json and a printed table; OUT/log.txt holds every stage's output.
# --cpu-dry-run: the same script end to end in miniature on CPU (what CI runs).
# Exit: 0 all passed, 1 a stage did not, 2 bad arguments or no GPU without --cpu-dry-run.
set -u
usage="usage: bash scripts/gpu_check.sh OUT [--quick] [--cpu-dry-run] [--wheels DIR]"
OUT="" MODE=full WHEELS=${GPU_CHECK_WHEELS:-}
while [ $# -gt 0 ]; do
  case $1 in
    --quick) [ "$MODE" = dry ] || MODE=quick ;;
    --cpu-dry-run) MODE=dry ;;
    --wheels) [ $# -ge 2 ] || { echo "error: --wheels: needs a folder; $usage" >&2; exit 2; }
              WHEELS=$2; shift ;;
    --wheels=*) WHEELS=${1#--wheels=} ;;
    -h|--help) echo "$usage"; exit 0 ;;
    -*) echo "error: $1: unknown option; $usage" >&2; exit 2 ;;
    *) [ -z "$OUT" ] || { echo "error: $1: a second OUT folder; $usage" >&2; exit 2; }
       OUT=$1 ;;
  esac
  shift
done
[ -n "$OUT" ] || { echo "error: OUT: missing; $usage" >&2; exit 2; }
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT" || { echo "error: $OUT: cannot create it; give a writable folder" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
if [ -z "$WHEELS" ]; then  # ../shared/wheels does not travel to the device; .whl/ in carry does
  WHEELS=$ROOT/../shared/wheels
  [ -d "$WHEELS" ] || [ ! -d "$ROOT/.whl" ] || WHEELS=$ROOT/.whl
fi
case $WHEELS in /*) ;; *) WHEELS=$PWD/$WHEELS ;; esac
SITE=${GPU_CHECK_SITE:-${TMPDIR:-/tmp}/gpu_check_site}
export GPU_CHECK_MODE=$MODE GPU_CHECK_WHEELS=$WHEELS GPU_CHECK_SITE=$SITE PYTHONUNBUFFERED=1
export PYTHONPATH="$SITE:$ROOT/scripts:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Tiny CPU shapes run fastest on one thread (tests/conftest.py); the GPU run keeps torch's choice.
[ "$MODE" != dry ] || export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PYTHON:-python3}
LOG=$OUT/log.txt
rm -f "$OUT"/install.json "$OUT"/gpu_tests.json "$OUT"/bf16_curve.json "$OUT"/parity.json \
      "$OUT"/speed.json "$OUT"/summary.json "$LOG"

# Time boxes in seconds: install, gpu_tests, bf16_curve, parity; speed gets what is left of TOTAL
# (GPU_CHECK_TOTAL_S) less 10 s for the summary. Full: 470 s in all, inside an 8-minute call.
case $MODE in
  dry) BOX=(60 90 90 150); TOTAL=${GPU_CHECK_TOTAL_S:-450} ;;
  *)   BOX=(45 120 75 150); TOTAL=${GPU_CHECK_TOTAL_S:-470} ;;
esac
START=$(date +%s)
echo "gpu_check: mode $MODE, out $OUT, wheels ${WHEELS:-none}, total ${TOTAL}s" | tee -a "$LOG"

run_stage() {  # NAME BOX_S: run one stage in its box (GNU timeout signals its whole group)
  local name=$1 box=$2 t0 rc tmp wall
  tmp=$(mktemp "${TMPDIR:-/tmp}/gpu_check_$name.XXXXXX")
  t0=$(date +%s%N)
  printf '\n===== %s (time box %s s) =====\n' "$name" "$box" >> "$LOG"
  GPU_CHECK_STAGE_DEADLINE=$(( $(date +%s) + box )) \
    timeout -k 10 "$box" "$PY" -m "gpu_check.$name" "$OUT" > "$tmp" 2>&1
  rc=$?
  cat "$tmp" >> "$LOG"
  wall=$(( ($(date +%s%N) - t0) / 1000000 ))  # ms
  wall=$(( wall / 1000 )).$(( wall % 1000 / 100 ))
  "$PY" -m gpu_check.finish "$OUT" "$name" "$rc" "$wall" "$tmp"
  rm -f "$tmp"
  echo "gpu_check: $name exit $rc after $wall s" | tee -a "$LOG"
}

run_stage install "${BOX[0]}"
if grep -q '"abort": true' "$OUT/install.json" 2>/dev/null; then
  "$PY" -m gpu_check.summary "$OUT" | tee -a "$LOG"
  echo "error: scripts/gpu_check.sh: no CUDA GPU here; use --cpu-dry-run for the CPU miniature" >&2
  exit 2
fi
run_stage gpu_tests "${BOX[1]}"
run_stage bf16_curve "${BOX[2]}"
run_stage parity "${BOX[3]}"
LEFT=$(( TOTAL - ($(date +%s) - START) - 10 ))
run_stage speed $(( LEFT > 15 ? LEFT : 15 ))
"$PY" -m gpu_check.summary "$OUT" | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
