#!/usr/bin/env bash
# lm-eval on SmolLM2 through longattn: lm-eval's own hf model, the longattn type with dense (equal to it), a
# sparse method and a KV policy, on the local pass-key task (scripts/make_lm_eval_task.py). Results and per-prompt
# samples go to evals/results/lm_eval_smollm2/<run>/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=evals/results/lm_eval_smollm2
TASK=${TASK:-longattn_passkey_1024}
DTYPE=${DTYPE:-float32}
MODEL=$(python -c "from longattn.pretrained import model_folder; print(model_folder('smollm2-135m-instruct'))")
common=(--include_path evals/lm_eval_tasks --tasks "$TASK" --device cpu --batch_size 1 --log_samples --seed 0)
run() {  # name, model type, model_args
  [ -d "$OUT/$1" ] && { echo "skip $1 (done)"; return; }
  start=$(date +%s.%N)
  if [ "$2" = hf ]; then lm_eval --model hf --model_args "$3" "${common[@]}" --output_path "$OUT/$1.partial"
  else longattn lm-eval --model longattn --model_args "$3" "${common[@]}" --output_path "$OUT/$1.partial"; fi
  echo "{\"run\": \"$1\", \"wall_s\": $(echo "$(date +%s.%N) - $start" | bc)}" > "$OUT/$1.partial/wall.json"
  mv "$OUT/$1.partial" "$OUT/$1"
}
mkdir -p "$OUT"
run hf hf "pretrained=$MODEL,dtype=$DTYPE"
run dense longattn "pretrained=smollm2-135m-instruct,patch=dense,dtype=$DTYPE"
run sink_window longattn "pretrained=smollm2-135m-instruct,patch=sink_window,patch_params=sink_tokens=4;window=252,dtype=$DTYPE"
run snapkv longattn "pretrained=smollm2-135m-instruct,patch=snapkv,patch_params=kv_budget=256,dtype=$DTYPE"
run streaming_llm longattn "pretrained=smollm2-135m-instruct,patch=streaming_llm,patch_params=sink_tokens=4;kv_budget=256,dtype=$DTYPE"
