#!/usr/bin/env bash
# The main job end to end on one dataset (the embedded ACDT by default):
#   bash run.sh
#   DATASET=synthetic SEEDS="2025 2026" DOMAINS="dom1 dom4" GPU_ID=0 bash run.sh
# Sets up .venv/ on first use (pinned requirements), then chains the stages that exist.
# Every default lives in config/overall.yaml; this script only chains the stages, and
# each stage finds the previous one's output from the same settings.
source "$(dirname "$0")/scripts/venv.sh"
DATASET="${DATASET:-ACDT}"
SEEDS="${SEEDS:-2025}"
GPU_ID="${GPU_ID:-0}"

echo "== data preparation: dataset=$DATASET"
python -m dataset.prepare dataset="$DATASET"
# Target domains: every domain of the dataset unless DOMAINS names some.
DOMAINS="${DOMAINS:-$(python -c "from data import PreparedDataset; print(' '.join(PreparedDataset('dataset', '$DATASET').domains.names))")}"

for seed in $SEEDS; do
    echo "== Stage I, pretraining: dataset=$DATASET seed=$seed"
    python pretrain.py dataset="$DATASET" seed="$seed" gpu_id="$GPU_ID"
    for target_dom in $DOMAINS; do
        echo "== Stage II, decoding: dataset=$DATASET seed=$seed target_dom=$target_dom"
        python decoding.py dataset="$DATASET" seed="$seed" gpu_id="$GPU_ID" target_dom="$target_dom"
    done
done

echo "Stage III (finetune.py) is not implemented yet: run.sh stops after Stage II."
echo "Prepared data: dataset/$DATASET/; checkpoints: checkpoint/$DATASET/;"
echo "regenerated training files: dataset/$DATASET/regenerated/; run logs and metrics: outputs/"
