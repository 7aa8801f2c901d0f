#!/usr/bin/env bash
# GPU check in one go (< 8 min on one GPU): what the CPU machines cannot test.
#   1. benchmarks/adapter_speed.py --device cuda --dtype bf16, n = 8: MELoRA vs PEFT LoRA(r) vs the per-mini loop
#   2. one bf16 ZeRO-2 trial on the in-process path (melora-tune train, 1 worker, use_gpu)
#   3. >= 2 GPUs: a 2-worker ZeRO-3 nccl trial (TorchTrainer); 1 GPU: two 0.5-GPU trials packed on it
#      (a tiny search, max_concurrent_trials 2)
#   4. an instruction trial (trec_instruct, MiniLM as a causal LM, exact match) in bf16, its measured peak GPU
#      memory beside the will-it-fit estimate; then the same with an NF4 base when bitsandbytes is installed
# then a short summary. Runs from a fresh clone (bash .ci/setup first when .venv is missing).
#
# Usage: bash benchmarks/gpu_check.sh [--out DIR] [--dry-run]
#   --out DIR   where logs, JSON and runs go (default: a new temp folder)
#   --dry-run   print the commands it would run (for the GPU count given by MELORA_GPUS, default 1); no GPU needed
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="" DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || { echo "gpu_check: --out needs a folder" >&2; exit 2; }; OUT=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1' (usage: bash benchmarks/gpu_check.sh [--out DIR] [--dry-run])" >&2; exit 2 ;;
  esac
done

PY=.venv/bin/python
if [ "$DRY" = 0 ]; then
  if [ ! -x "$PY" ]; then
    bash .ci/setup || { echo "gpu_check: .ci/setup failed" >&2; exit 2; }
  fi
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA GPU visible to torch (torch.cuda.is_available() is false): nothing to check here" >&2
    exit 2
  fi
  NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
else
  NGPU=${MELORA_GPUS:-1}
fi
OUT=${OUT:-$(mktemp -d -t melora-gpu-check-XXXX)}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_AIR_NEW_OUTPUT=0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, whatever the venv's editable install points at

SMALL=(max_train_samples=512 max_eval_samples=128 epochs=1 micro_batch_size=32 max_length=64 eval_every_steps=8
       use_gpu=true precision=bf16 keep_checkpoints=1)
STATUS=()

# run NAME SECONDS CMD...: one step under a time limit; stdout to $OUT/NAME.stdout, stderr to $OUT/NAME.log
run() {
  local name=$1 limit=$2; shift 2
  if [ "$DRY" = 1 ]; then
    printf '%s (limit %ss):' "$name" "$limit"; printf ' %q' "$@"; echo; return 0
  fi
  echo "== $name (limit ${limit}s)" >&2
  local t0=$SECONDS rc=0
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.stdout" 2>"$OUT/$name.log" || rc=$?
  STATUS+=("$name rc=$rc $((SECONDS - t0))s")
  [ "$rc" = 0 ] || tail -5 "$OUT/$name.log" >&2
}

run adapter_speed 120 "$PY" benchmarks/adapter_speed.py --device cuda --dtype bf16 --ns 8 --json "$OUT/adapter_speed.out.json"

run trial_zero2_inprocess 150 "$PY" -m melora_tune.cli train melora_tune/trial/example_trial.yaml \
  --storage-path "$OUT/runs" --name zero2-inprocess --json --set "${SMALL[@]}" zero_stage=2 num_workers=1

if [ "$NGPU" -ge 2 ]; then
  run trial_zero3_2gpu 180 "$PY" -m melora_tune.cli train melora_tune/trial/example_trial.yaml \
    --storage-path "$OUT/runs" --name zero3-2gpu --json --set "${SMALL[@]}" zero_stage=3 num_workers=2 gpus_per_worker=1
else
  cat >"$OUT/packed.yaml" <<'EOF'
name: gpu-packed
model: minilm
task: {name: rotten_tomatoes, max_train_samples: 512, max_eval_samples: 128, seed: 0}
budget: {max_params: 18432, min_fraction: 0.5}
methods: [lora]
space: {lr: {low: 1.0e-3, high: 1.0e-2, log: true}, r: [2]}
training: {epochs: 1, micro_batch_size: 32, max_length: 64, zero_stage: 2, precision: bf16, keep_checkpoints: 1}
asha: {enabled: false}
num_samples: 2
max_concurrent_trials: 2
resources: {num_workers: 1, cpus_per_worker: 1, gpus_per_worker: 0.5, max_failures: 0}
EOF
  run search_packed_half_gpus 180 "$PY" -m melora_tune.cli search "$OUT/packed.yaml" --storage-path "$OUT/runs" \
    --tracking-uri "sqlite:///$OUT/mlflow.db" --name packed --json
fi

INSTRUCT=(model=minilm task_type=causal_lm task.path=null task.name=trec_instruct "adapter.target_modules=[query,value]"
          "adapter.modules_to_save=[cls.predictions.transform]" "task.prompt_template={instruction} Question: {input} Answer:"
          max_train_samples=512 max_eval_samples=128 epochs=1 micro_batch_size=16 max_length=64 method=lora r=2 lr=4e-3
          use_gpu=true precision=bf16 keep_checkpoints=1 num_workers=1 zero_stage=2)
[ "$DRY" = 1 ] || printf '%s\n' "${INSTRUCT[@]}" >"$OUT/instruct_settings.txt"  # for the estimate in the summary
run instruct_bf16 150 "$PY" -m melora_tune.cli train melora_tune/trial/example_trial.yaml \
  --storage-path "$OUT/runs" --name instruct-bf16 --json --set "${INSTRUCT[@]}"
if [ "$DRY" = 1 ] || "$PY" -c "import bitsandbytes" 2>/dev/null; then
  run instruct_nf4 150 "$PY" -m melora_tune.cli train melora_tune/trial/example_trial.yaml \
    --storage-path "$OUT/runs" --name instruct-nf4 --json --set "${INSTRUCT[@]}" quantization=nf4
else
  STATUS+=("instruct_nf4 skipped: bitsandbytes is not installed (pip install bitsandbytes)")
fi

[ "$DRY" = 1 ] && exit 0

echo
echo "GPU check ($NGPU GPU(s), $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')), output in $OUT"
printf '  %s\n' "${STATUS[@]}"
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])


def last_json(name):
    path = out / f"{name}.stdout"
    if not path.is_file():
        return None
    for line in reversed(path.read_text().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None


speed = out / "adapter_speed.out.json"
if speed.is_file():
    print("  adapter_speed:", speed, "(table:", out / "adapter_speed.stdout", ")")
for name in ("trial_zero2_inprocess", "trial_zero3_2gpu"):
    r = last_json(name)
    if r:
        m = r.get("metrics") or {}
        print(f"  {name}: {r['status']} step {r['step']}/{r['total_steps']} accuracy {m.get('eval_accuracy')} "
              f"{m.get('samples_per_s')} samples/s" + (f" ({r['reason']})" if r.get("reason") else ""))
for name in ("instruct_bf16", "instruct_nf4"):
    r = last_json(name)
    if r:
        from melora_tune.trial.config import load_trial_config
        from melora_tune.trial.memory import estimate
        from melora_tune.trial.prepare import prepare_trial

        m = r.get("metrics") or {}
        settings = (out / "instruct_settings.txt").read_text().splitlines() + (["quantization=nf4"] if "nf4" in name else [])
        cfg = prepare_trial(load_trial_config("melora_tune/trial/example_trial.yaml", settings)).cfg
        est = f"{estimate(cfg).per_worker / 2**30:.2f}"
        print(f"  {name}: {r['status']} exact match {m.get('eval_exact_match')} perplexity {m.get('eval_perplexity')}, "
              f"peak GPU memory {m.get('gpu_peak_mem_gib')} GiB (estimate {est} GiB)"
              + (f" ({r['reason']})" if r.get("reason") else ""))
s = last_json("search_packed_half_gpus")
if s:
    rows = [(t["trial_id"], t["status"], t.get("score")) for t in s["trials"]]
    # packed: the two 0.5-GPU trials' running times (last report's timestamp minus its time_total_s) overlap
    spans = []
    for f in (out / "runs" / "packed").glob("trial_*/result.json"):
        rows = [json.loads(l) for l in f.read_text().splitlines() if l.strip()]
        if rows:
            spans.append((rows[-1]["timestamp"] - rows[-1]["time_total_s"], rows[-1]["timestamp"]))
    overlap = len(spans) == 2 and max(a for a, _ in spans) <= min(b for _, b in spans)
    print(f"  search_packed_half_gpus: {s['status']}, trials {rows}, ran side by side: {overlap}")
EOF
for s in "${STATUS[@]}"; do case "$s" in *" rc=0 "*|*" skipped:"*) ;; *) exit 1 ;; esac; done
exit 0
