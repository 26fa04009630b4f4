#!/usr/bin/env bash
# The worked study, end to end (about 25 minutes on one free CPU core; see README.md):
#   1. router ablation: {vanilla, modality_aware} x {0, 2} shared experts x seeds {1, 2, 3}   (12 runs)
#   2. Optuna split-ratio sweep: 10 trials over the audio-expert fraction (TPE, median pruning)
#   3. the sweep's best fraction again with seeds 2 and 3 (the seed spread at the optimum)
#   4. the summary: tables + plots into experiments/router_split_study/results/
# Runs go to logs/router_split_study/ (ignored by git); the Optuna study to logs/router_split_study/*.db.
# Re-running resumes the Optuna sweep (finished trials kept) but repeats the grid runs of steps 1 and 3.
#   bash experiments/router_split_study/run_study.sh            # everything
#   bash experiments/router_split_study/run_study.sh summarize  # only step 4 (from the existing runs)
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
STUDY=experiments/router_split_study
LOGS=logs/router_split_study
COMMON=(-cd "$STUDY/conf" +study=cpu60)

summarize() {
  python -m most_lightning.experiments.summarize "$LOGS/router_ablation" "$LOGS/split_sweep" "$LOGS/best_split_seeds" \
    --study "sqlite:///$LOGS/split_ratio_study.db" --study-name split_ratio_study \
    --metrics val/nll test/nll test/tts_unit_nll test/text_nll test/asr_wer test/expert_load/audio_to_audio_group \
    --cell-keys router.name model.n_shared_experts model.audio_expert_fraction --seed-key seed \
    --heatmaps 2 --out "$STUDY/results"
}
if [[ "${1:-}" == "summarize" ]]; then summarize; exit; fi

mkdir -p "$STUDY/results"
start=$(date +%s)
python run.py -m "${COMMON[@]}" experiment=router_ablation router=vanilla,modality_aware seed=1,2,3 hydra.sweep.dir="$LOGS/router_ablation"
t1=$(date +%s)
python run.py -m "${COMMON[@]}" hparams_search=split_ratio_study seed=1 hydra.sweep.dir="$LOGS/split_sweep"
t2=$(date +%s)
best=$(python -c "
import optuna; s = optuna.load_study(study_name='split_ratio_study', storage='sqlite:///$LOGS/split_ratio_study.db')
print(s.best_trial.params['model.audio_expert_fraction'])")
python run.py -m "${COMMON[@]}" model.audio_expert_fraction="$best" seed=2,3 task_name=router_split_study \
  hydra.sweep.dir="$LOGS/best_split_seeds"
t3=$(date +%s)
echo "wall time: router ablation $((t1 - start)) s, split sweep $((t2 - t1)) s, best-split seeds $((t3 - t2)) s," \
     "total $((t3 - start)) s (OMP_NUM_THREADS=$OMP_NUM_THREADS)" | tee "$STUDY/results/wall_time.txt"
summarize
