#!/usr/bin/env bash
# The seed study of the README ("Seeds and the study"): train and evaluate every (ablation, seed) pair with
# the same `atmask` commands the DVC stages run, then `atmask report` (mean ± std, paired 95% t-intervals).
#   bash bench/study.sh DATA OUT "ABLATIONS" "SEEDS" [RECIPE]
# DATA: an ingested COCO folder (atmask ingest); OUT: gets runs/<ablation>/seed<k>/, reports/, mlflow.db.
# Pairs whose metrics.json exists are kept, so an interrupted study resumes where it stopped.
set -euo pipefail
data=$1 out=$2 ablations=$3 seeds=$4 recipe=${5:-}
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$(realpath -m "$out")/mlflow.db}
mkdir -p "$out"
for seed in $seeds; do
  for ablation in $ablations; do
    run=$out/runs/$ablation/seed$seed
    mkdir -p "$(dirname "$run")"
    [ -f "$run/metrics.json" ] && continue
    start=$(date +%s)
    atmask train --config "$ablation" --seed "$seed" --data "$data" --out "$run" --no-resume \
      ${recipe:+--recipe "$recipe"} > "$run.train.log" 2>&1 || { tail -5 "$run.train.log"; exit 1; }
    atmask evaluate --run "$run" --data "$data" > "$run.eval.log" 2>&1 || { tail -5 "$run.eval.log"; exit 1; }
    echo "$ablation seed$seed: $(( $(date +%s) - start )) s"
  done
done
atmask report --runs "$out/runs" --out "$out/reports"
