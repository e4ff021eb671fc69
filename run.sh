#!/usr/bin/env bash
# The main job end to end (the official run.sh's chain), on the embedded ACDT dataset by default:
#   bash run.sh
#   DATASET=synthetic SEEDS="2025 2026" DOMAINS="dom1 dom4" BACKBONES="SASRec GRU4Rec" GPU_ID=0 bash run.sh
#   BASELINES="ABXI CGRec SyNCRec" bash run.sh      # adds the cross-domain baselines' rows to the table
#   LAUNCHER=joblib bash run.sh launcher:hydra.launcher.n_jobs=4   # sweeps run in parallel (requirements-cluster.txt)
#   NPROC=4 bash run.sh                              # every stage on 4 processes (torchrun, one GPU each)
# Sets up .venv/ on first use (pinned requirements), then: prepare the data; per seed, pretrain
# once (Stage I) and decode every target domain (Stage II); fine-tune every backbone on new, sim
# and full data of every target domain (Stage III); print the results table; draw the diagnostics,
# mapping views and results figure (analysis/).
#
# Arguments are Hydra overrides. KEY=VALUE goes to every stage that reads KEY (pipeline/routing.py:
# the later stages find the earlier ones' outputs from the same keys): trainer.base.epochs=50,
# decoder.hidden_size=64, experiment=wo_sde, ... go to Stages I to III; the keys only Stage III reads
# (model.*, model_name, train_type, eval_history, new_inter_path, trainer.finetune.*) to finetune.py
# alone; the dataset keys and progress to every stage, logger.*, checkpoint_dir and gpu_id to every
# stage that trains. STAGE:KEY=VALUE goes to one stage only (STAGE: prepare, pretrain, decoding,
# finetune, baseline), e.g. finetune:eval_batch_size=512; the baselines' own keys (baseline_fidelity,
# select_on, recompute_activations, trainer.baseline.*) go to cdsr_baseline/train.py alone. LAUNCHER names a Hydra launcher
# (joblib, submitit_local, submitit_slurm) for the sweeps of Stages II and III and the baselines, and
# launcher:KEY=VALUE sets its keys (hydra.launcher.partition=..., ...). NPROC > 1 runs every stage
# under torchrun: NPROC processes train data-parallel (Stages I, III, baselines) or share the rows to
# decode (Stage II); the sweeps then run their jobs one after another, and LAUNCHER is not used.
source "$(dirname "$0")/scripts/venv.sh"
DATASET="${DATASET:-ACDT}"
SEEDS="${SEEDS:-2025}"
BACKBONES="${BACKBONES:-SASRec}"
BASELINES="${BASELINES:-}"
GPU_ID="${GPU_ID:-0}"
LAUNCHER="${LAUNCHER:-}"
NPROC="${NPROC:-1}"
RUN="outputs/run.sh/$DATASET/$(date +%Y-%m-%d_%H-%M-%S)"
join() { local IFS=,; echo "$*"; }

PREPARE=() PRETRAIN=() DECODING=() FINETUNE=() BASELINE=() SWEEP=()
PY=(python)
if [ "$NPROC" -gt 1 ]; then
    PY=(torchrun --standalone --nproc_per_node="$NPROC")
elif [ -n "$LAUNCHER" ]; then
    SWEEP+=("hydra/launcher=$LAUNCHER")
fi
ROUTED=()
for arg in "$@"; do
    case "$arg" in
        launcher:*) [ "$NPROC" -gt 1 ] || SWEEP+=("${arg#launcher:}") ;;
        *) ROUTED+=("$arg") ;;
    esac
done
# Every other argument goes to the stages that read its key: one table, pipeline/routing.py.
routes="$(python -m pipeline.routing "${ROUTED[@]}")" || exit 2
while IFS=$'\t' read -r stage arg; do
    case "$stage" in
        prepare) PREPARE+=("$arg") ;;
        pretrain) PRETRAIN+=("$arg") ;;
        decoding) DECODING+=("$arg") ;;
        finetune) FINETUNE+=("$arg") ;;
        baseline) BASELINE+=("$arg") ;;
    esac
done <<< "$routes"

echo "== data preparation: dataset=$DATASET"
python -m dataset.prepare dataset="$DATASET" "${PREPARE[@]}"
# Target domains: every domain of the dataset unless DOMAINS names some.
DOMAINS_GIVEN="${DOMAINS:-}"
DOMAINS="${DOMAINS:-$(python -c "from pipeline.settings import compose; from pipeline.artifacts import open_dataset; \
import sys; print(' '.join(open_dataset(compose('prepare', sys.argv[1:])).domains.names))" \
    dataset="$DATASET" "${PREPARE[@]}")}"

for seed in $SEEDS; do
    echo "== Stage I, pretraining: dataset=$DATASET seed=$seed"
    "${PY[@]}" pretrain.py dataset="$DATASET" seed="$seed" gpu_id="$GPU_ID" hydra.run.dir="$RUN/pretrain/seed_$seed"'${rank_suffix:}' \
        "${PRETRAIN[@]}"
done
echo "== Stage II, decoding: dataset=$DATASET seeds=$SEEDS target domains=$DOMAINS"
# every target domain in one pass (each row encoded once per model), unless DOMAINS names some
TARGETS="$( [ -n "${DOMAINS_GIVEN:-}" ] && join $DOMAINS || echo all )"
"${PY[@]}" decoding.py -m "${SWEEP[@]}" dataset="$DATASET" seed="$(join $SEEDS)" gpu_id="$GPU_ID" \
    target_dom="$TARGETS" hydra.sweep.dir="$RUN/decoding" "${DECODING[@]}"
echo "== analysis: regeneration diagnostics (Figure 5) and mapping views (Figure 4) of every decoded domain"
for seed in $SEEDS; do
    for target in $DOMAINS; do
        for view in diagnostics mapping_view; do
            python -m analysis."$view" --target "$target" --out "$RUN/analysis/seed_$seed" \
                dataset="$DATASET" seed="$seed" "${DECODING[@]}"
        done
    done
done
echo "== Stage III, fine-tuning: backbones=$BACKBONES on new, sim and full data"
"${PY[@]}" finetune.py -m dataset="$DATASET" seed="$(join $SEEDS)" gpu_id="$GPU_ID" target_dom="$(join $DOMAINS)" \
    train_type=new,sim,full model_name="$(join $BACKBONES)" hydra.sweep.dir="$RUN/finetune" "${SWEEP[@]}" \
    "${FINETUNE[@]}"

if [ -n "$BASELINES" ]; then
    echo "== cross-domain baselines: $BASELINES (one model for every domain, per seed)"
    "${PY[@]}" cdsr_baseline/train.py -m dataset="$DATASET" seed="$(join $SEEDS)" gpu_id="$GPU_ID" \
        model="$(join $BASELINES)" hydra.sweep.dir="$RUN/baseline" "${SWEEP[@]}" "${BASELINE[@]}"
fi

echo "== results (test metrics, Table 2 layout)"
python results.py "$RUN/finetune" $( [ -n "$BASELINES" ] && echo "$RUN/baseline" ) --out "$RUN"
python -m analysis.results_figure "$RUN/table.csv" --out "$RUN/ndcg10.png"
echo "Prepared data: dataset/$DATASET/; checkpoints: checkpoint/$DATASET/; regenerated files: regenerated/$DATASET/;"
echo "this run's logs, configs, metrics, table and figures: $RUN/"
