#!/usr/bin/env bash
# Every CUDA path of the product on one GPU, in one go: prints one JSON line with each part's figures and exits 1 if
# any part failed (a missed performance target is reported, not a failure).
#
#   benchmarks/gpu_check.sh [--dry-run] [--only PART[,PART...]] [--out DIR]
#
# Parts, each a benchmark run in its own process with a time limit (seconds on one H100):
#   train         300m LLM training steps in bf16 through train.engine.fit (Ray Train + DeepSpeed ZeRO-3): MFU against
#                 the measured bf16 matmul peak and against 989 TFLOP/s, tokens/s, peak GPU memory   (200)
#   tokenizer     paper MAGVIT-v2 (and SoundStream) encode/decode clips/s and TFLOP/s in bf16        (40)
#   tokenize_job  the Ray Data tokenize job with tokenizer actors on the GPU: clips/s per GPU         (90)
#   generate      KV-cached sampling of a 1,280-token video from the 300m LLM in bf16: tokens/s       (50)
#   superres      a super-resolution block, forward + backward in bf16, windowed vs full attention  (25)
#   eval          `videopoet eval` with generation and feature actors on the GPU: samples/s          (75)
# The limits add up to 8 minutes. --dry-run runs the same parts on the CPU with debug flavors and tiny sizes (seconds
# each), so that everything but the CUDA-only branches runs in CI (tests/test_gpu_check.py). --only re-runs some
# parts. Each part's output goes to OUT/<part>.log (default OUT: runs/gpu_check/<date>T<time>[-dry-run]).
# Needs the repository's environment (`make install`); uses .venv/bin/python when present, else python.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY=python
[[ -x .venv/bin/python ]] && PY=.venv/bin/python

DRY=0
ONLY=""
OUT=""
while (($#)); do
  case "$1" in
    --dry-run) DRY=1 ;;
    --only) [[ $# -ge 2 ]] || { echo "gpu_check.sh: --only needs a value" >&2; exit 2; }; ONLY="$2"; shift ;;
    --out) [[ $# -ge 2 ]] || { echo "gpu_check.sh: --out needs a value" >&2; exit 2; }; OUT="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

PARTS=(train tokenizer tokenize_job generate superres eval)
if [[ -n "$ONLY" ]]; then
  IFS=, read -r -a WANTED <<<"$ONLY"
  for part in "${WANTED[@]}"; do
    if [[ " ${PARTS[*]} " != *" $part "* ]]; then
      echo "gpu_check.sh: unknown part '$part' (parts: ${PARTS[*]})" >&2
      exit 2
    fi
  done
  PARTS=("${WANTED[@]}")
fi

# name -> "timeout_s|script|arguments" for the GPU, and the dry run's CPU equivalents.
declare -A CUDA=(
  [train]="200|train_step.py|--device cuda --flavor 300m --batch 16 --warmup 3 --steps 4 --rounds 1"
  [tokenizer]="40|tokenizer.py|--device cuda --flavors paper --batch 4 --rounds 3"
  [tokenize_job]="90|tokenize_job.py|--device cuda --flavor paper --clips 64 --rounds 1 --warmup-clips 0"
  # SDPA for the uncached baseline, which runs a full forward at each of 1,282 lengths: FlexAttention would compile
  # for new shapes there. The cached path runs SDPA whatever the setting.
  [generate]="50|generate.py|--device cuda --flavor 300m --dtype bfloat16 --rounds 2 --set attention=sdpa"
  [superres]="25|superres.py|--device cuda --grid 5 16 32 --width 512 --heads 8 --rounds 3"
  [eval]="75|eval_stage.py|--device cuda --flavor demo --config paper --samples 8 --real 4"
)
declare -A DRY_RUN=(
  [train]="300|train_step.py|--device cpu --flavor debug --batch 2 --warmup 1 --steps 2 --rounds 1"
  [tokenizer]="120|tokenizer.py|--device cpu --flavors debug --batch 1 --rounds 1 --threads 1"
  [tokenize_job]="300|tokenize_job.py|--device cpu --flavor debug --clips 4 --rounds 1 --warmup-clips 0"
  [generate]="120|generate.py|--device cpu --flavor debug --rounds 1 --latent 2 4 4"
  [superres]="120|superres.py|--device cpu --grid 2 8 16 --width 32 --heads 2 --rounds 1"
  [eval]="300|eval_stage.py|--device cpu --flavor debug --config debug --samples 3 --real 1"
)

if ((DRY)); then
  MODE=dry-run
else
  MODE=cuda
  "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' || {
    echo "gpu_check.sh: no CUDA device visible to $PY (torch.cuda.is_available() is False); on a CPU machine run" \
         "benchmarks/gpu_check.sh --dry-run" >&2
    exit 2
  }
fi
if [[ -z "$OUT" ]]; then
  OUT="runs/gpu_check/$(date -u +%Y%m%dT%H%M%S)"
  ((DRY)) && OUT="$OUT-dry-run"
fi
mkdir -p "$OUT"

# Each part starts its own embedded Ray on this machine, never a cluster named by RAY_ADDRESS; its workers' output
# and Ray Data's progress bars stay out of the log.
unset RAY_ADDRESS
export RAY_DATA_DISABLE_PROGRESS_BARS=1 VIDEOPOET_RAY_LOGS=0 PYTHONUNBUFFERED=1

RECORDS="$OUT/parts.tsv"
: >"$RECORDS"
began=$SECONDS
for part in "${PARTS[@]}"; do
  if ((DRY)); then spec="${DRY_RUN[$part]}"; else spec="${CUDA[$part]}"; fi
  IFS='|' read -r limit script arguments <<<"$spec"
  work=()
  [[ "$script" == tokenize_job.py || "$script" == eval_stage.py ]] && work=(--work "$OUT/$part")
  log="$OUT/$part.log"
  start=$SECONDS
  rc=0
  # shellcheck disable=SC2086  # the arguments are word lists
  timeout --kill-after=20 "$limit" "$PY" "benchmarks/$script" $arguments "${work[@]}" >"$log" 2>&1 || rc=$?
  seconds=$((SECONDS - start))
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$part" "$rc" "$seconds" "$limit" "$script $arguments" "$log" >>"$RECORDS"
  case $rc in
    0) status=ok ;;
    124 | 137) status="timed out" ;;
    *) status="failed (exit $rc)" ;;
  esac
  echo "gpu_check [$MODE] $part: $status in ${seconds}s (log: $log)" >&2
done

"$PY" - "$RECORDS" "$MODE" "$((SECONDS - began))" <<'EOF'
"""The parts' records and each log's last JSON line -> one JSON line; exit 1 if any part failed."""
import datetime
import json
import sys

records, mode, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3])
TARGETS = {"llm_mfu": 0.40, "video_tokenizer_utilization": 0.30}  # issue 20, on one H100 in bf16


def last_json(path):
    with open(path, errors="replace") as log:
        for line in reversed(log.read().splitlines()):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None


parts = {}
for line in open(records):
    name, rc, took, limit, command, log = line.rstrip("\n").split("\t")
    figures = last_json(log)
    parts[name] = {"ok": rc == "0" and figures is not None, "exit": int(rc), "timed_out": rc in ("124", "137"),
                   "seconds": int(took), "limit_s": int(limit), "command": f"python benchmarks/{command}",
                   "log": log, "figures": figures}


def figure(part, *keys):
    value = (parts.get(part) or {}).get("figures")
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


tokenizer = figure("tokenizer", "ratio_of")
video = tokenizer.split()[0] if tokenizer else None  # "video/paper achieved FLOP/s / matmul peak"
headline = {
    "llm_mfu": figure("train", "trainer_mfu"), "llm_mfu_vs_989": figure("train", "trainer_mfu_spec"),
    "matmul_peak_tflops": figure("train", "peak_tflops"), "llm_tokens_per_s": figure("train", "trainer_tokens_per_s"),
    "llm_peak_memory_gib": figure("train", "trainer_peak_memory_gib"),
    "video_tokenizer_encode_clips_per_s": figure("tokenizer", "results", video, "encode_clips_per_s"),
    "video_tokenizer_decode_clips_per_s": figure("tokenizer", "results", video, "decode_clips_per_s"),
    "video_tokenizer_encode_tflops": figure("tokenizer", "results", video, "encode_tflops"),
    "video_tokenizer_decode_tflops": figure("tokenizer", "results", video, "decode_tflops"),
    "video_tokenizer_utilization": figure("tokenizer", "ratio"),
    "tokenize_job_clips_per_s_per_gpu": figure("tokenize_job", "job_clips_per_s_per_gpu"),
    "tokenize_job_clips_per_s": figure("tokenize_job", "clips_per_s", "job"),
    "generate_tokens_per_s": figure("generate", "cached_tokens_per_s"),
    "superres_windowed_tokens_per_s": figure("superres", "windowed_tokens_per_s"),
    "eval_samples_per_s": figure("eval", "samples_per_s"),
}
headline = {name: float(f"{value:.4g}") if isinstance(value, float) else value for name, value in headline.items()}
ok = all(p["ok"] for p in parts.values())
result = {"check": "gpu_check", "mode": mode, "date": datetime.date.today().isoformat(), "ok": ok,
          "seconds": seconds, "failed": [name for name, p in parts.items() if not p["ok"]], "headline": headline}
if mode == "cuda":  # the dry run's debug flavors on a CPU have no targets
    result["targets"] = {name: {"target": bar, "value": headline[name],
                                "met": headline[name] is not None and headline[name] >= bar}
                         for name, bar in TARGETS.items()}
result["parts"] = parts
print(json.dumps(result))
sys.exit(0 if ok else 1)
EOF
