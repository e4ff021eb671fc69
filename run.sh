#!/usr/bin/env bash
# The main job end to end (the official run.sh's chain), on the embedded ACDT dataset by default:
#   bash run.sh
#   DATASET=synthetic SEEDS="2025 2026" DOMAINS="dom1 dom4" BACKBONES="SASRec GRU4Rec" GPU_ID=0 bash run.sh
# Sets up .venv/ on first use (pinned requirements), then: prepare the data; per seed, pretrain
# once (Stage I) and decode every target domain (Stage II); fine-tune every backbone on new, sim
# and full data of every target domain (Stage III); print the results table; draw the diagnostics,
# mapping views and results figure (analysis/).
# Every setting lives in config/overall.yaml; this script only chains the stages, and each stage
# finds the previous one's output from the same settings. Extra Hydra overrides for every stage
# can be given as arguments, e.g. `bash run.sh epochs=50`.
source "$(dirname "$0")/scripts/venv.sh"
DATASET="${DATASET:-ACDT}"
SEEDS="${SEEDS:-2025}"
BACKBONES="${BACKBONES:-SASRec}"
GPU_ID="${GPU_ID:-0}"
RUN="outputs/run.sh/$DATASET/$(date +%Y-%m-%d_%H-%M-%S)"
join() { local IFS=,; echo "$*"; }

echo "== data preparation: dataset=$DATASET"
python -m dataset.prepare dataset="$DATASET"
# Target domains: every domain of the dataset unless DOMAINS names some.
DOMAINS="${DOMAINS:-$(python -c "from data import PreparedDataset; print(' '.join(PreparedDataset('dataset', '$DATASET').domains.names))")}"

for seed in $SEEDS; do
    echo "== Stage I, pretraining: dataset=$DATASET seed=$seed"
    python pretrain.py dataset="$DATASET" seed="$seed" gpu_id="$GPU_ID" hydra.run.dir="$RUN/pretrain/seed_$seed" "$@"
done
echo "== Stage II, decoding: dataset=$DATASET seeds=$SEEDS target domains=$DOMAINS"
python decoding.py -m dataset="$DATASET" seed="$(join $SEEDS)" gpu_id="$GPU_ID" target_dom="$(join $DOMAINS)" \
    hydra.sweep.dir="$RUN/decoding" "$@"
echo "== analysis: regeneration diagnostics (Figure 5) and mapping views (Figure 4) of every decoded domain"
for report in "$RUN"/decoding/*/metrics.json; do
    read -r file target seed < <(python -c "import json, sys; r = json.load(open(sys.argv[1])); \
print(r['file'], r['target_dom'], r['file'].rsplit('/', 1)[1].split('.')[1])" "$report")
    python -m analysis.diagnostics --dataset "$DATASET" --target "$target" --regenerated "$file" \
        --out "$RUN/analysis/seed_$seed"
    python -m analysis.mapping_view --dataset "$DATASET" --target "$target" --regenerated "$file" \
        --out "$RUN/analysis/seed_$seed"
done
echo "== Stage III, fine-tuning: backbones=$BACKBONES on new, sim and full data"
python finetune.py -m dataset="$DATASET" seed="$(join $SEEDS)" gpu_id="$GPU_ID" target_dom="$(join $DOMAINS)" \
    train_type=new,sim,full model_name="$(join $BACKBONES)" hydra.sweep.dir="$RUN/finetune" "$@"

echo "== results (test metrics, Table 2 layout)"
python results.py "$RUN/finetune" --out "$RUN"
python -m analysis.results_figure "$RUN/table.csv" --out "$RUN/ndcg10.png"
echo "Prepared data: dataset/$DATASET/ (regenerated files in dataset/$DATASET/regenerated/);"
echo "checkpoints: checkpoint/$DATASET/; this run's logs, configs, metrics, table and figures: $RUN/"
