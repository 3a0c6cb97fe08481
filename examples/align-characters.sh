#!/usr/bin/env bash
# Audit → align → re-audit on the real SmolLM2-135M-Instruct, on this CPU (~25 minutes on
# 2 cores; training a 135M model on 450-token sequences costs ~40 s a step here).
#
#   1. audit:    the English character experiment (examples/characters.toml), 50 samples
#                per description: how often is the character male?
#   2. pairs:    from the audit's own samples, female characters (chosen) against male
#                ones (rejected) of the same description, reasoning and answer included
#   3. reward:   a reward model trained on those pairs (TRL RewardTrainer), the last 8 of
#                its 30 blocks and the score head trained
#   4. DPO:      the model aligned on the same pairs (TRL DPOTrainer), the same 8 blocks
#   5. re-audit: the same spec and seeds on both models in one run; the gender share per
#                model with a test inside each description, the class distribution, the
#                answer validity and the reward of every sample
#   6. cost:     the 40 easy questions, base against aligned (log-likelihood, paired tests)
#
# Needs the real model's folder: `make demo` builds it, or
#   muestra kit build --preset smollm2-135m-instruct --out ~/.cache/muestra/kit/smollm2-135m-instruct
set -euo pipefail
cd "$(dirname "$0")"
MUESTRA=${MUESTRA:-muestra}
KIT=${KIT:-$HOME/.cache/muestra/kit/smollm2-135m-instruct}
WORK=${WORK:-/tmp/muestra-align}
SAMPLES=${SAMPLES:-50}
PAIRS=${PAIRS:-8}  # at most this many pairs per description
mkdir -p "$WORK"
step() { printf '\n$ %s\n' "$*"; "$@"; }

step $MUESTRA run characters.toml --model "$KIT" --samples "$SAMPLES" --out "$WORK/audit.db"
step $MUESTRA summary "$WORK/audit.db" --field gender
step $MUESTRA pairs "$WORK/audit.db" --chosen 'gender == "female"' --rejected 'gender == "male"' \
    --max-per-prompt "$PAIRS" --out "$WORK/pairs.jsonl"
step $MUESTRA reward train --base "$KIT" --data "$WORK/pairs.jsonl" --out "$WORK/reward" \
    --epochs 2 --lr 5e-5 --train-layers 8 --eval-fraction 0.25 --overwrite
step $MUESTRA align dpo --base "$KIT" --data "$WORK/pairs.jsonl" --out "$WORK/aligned" \
    --epochs 2 --lr 5e-5 --beta 0.1 --train-layers 8 --eval-fraction 0.25 --overwrite
step $MUESTRA compare "$KIT" "$WORK/aligned" --spec characters.toml --samples "$SAMPLES" \
    --out "$WORK/reaudit.db"
step $MUESTRA reward score "$WORK/reaudit.db" --reward "$WORK/reward"
step $MUESTRA summary "$WORK/reaudit.db" --by model --field class
step $MUESTRA analyze "$WORK/reaudit.db"
step $MUESTRA compare "$KIT" "$WORK/aligned" --task easy-en --method loglik \
    --out "$WORK/easy.db"
