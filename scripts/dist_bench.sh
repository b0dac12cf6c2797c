#!/usr/bin/env bash
# One process against NPROC data-parallel processes (torchrun, learner/distributed.py) on the
# same protocol, seed and budget: training images/s and accuracy side by side.
#
#   scripts/dist_bench.sh                     # cifar10-b0-s5 at the budget below, CPU
#   EPOCHS=1 PER_CLASS=100 scripts/dist_bench.sh   # a check in a minute
#   DEVICE=cuda NPROC=2 scripts/dist_bench.sh      # NCCL, one GPU a process
#
# The budget (stated in the table's header): EPOCHS epochs a step, no step minimum,
# PER_CLASS training images a class (empty: all 5,000), ResNet-32, memory 2,000, seed 1993.
# On the CPU both runs get the same cores: THREADS in all, split evenly between the ranks
# (one process with THREADS threads against NPROC processes with THREADS / NPROC each).
# Writes results/distributed/<run>/{1proc,<N>proc}/<result>.json, their logs, and
# results/distributed/<run>.txt with the comparison.
set -euo pipefail
cd "$(dirname "$0")/.."

PROTOCOL=${PROTOCOL:-cifar10-b0-s5}
NPROC=${NPROC:-2}
EPOCHS=${EPOCHS:-2}
PER_CLASS=${PER_CLASS:-}
DEVICE=${DEVICE:-cpu}
THREADS=${THREADS:-$(nproc)}
SEED=${SEED:-1993}
OUT=${OUT:-results/distributed}

per_rank=$((THREADS / NPROC))
((per_rank >= 1)) || per_rank=1
run="${PROTOCOL}_e${EPOCHS}${PER_CLASS:+_pc$PER_CLASS}_${DEVICE}_np${NPROC}"
dir="$OUT/$run"
mkdir -p "$dir/1proc" "$dir/${NPROC}proc"

common=(--protocol "$PROTOCOL" --epochs "$EPOCHS" --min-steps 0 --seed "$SEED"
  --device "$DEVICE" --no-progress)
[ -n "$PER_CLASS" ] && common+=(--max-train-per-class "$PER_CLASS")

echo "1 process, $THREADS threads" >&2
.venv/bin/python -m learner.bench "${common[@]}" --threads "$THREADS" --out "$dir/1proc" \
  | tee "$dir/1proc.log"
echo "$NPROC processes, $per_rank threads each" >&2
OMP_NUM_THREADS=$per_rank .venv/bin/torchrun --nproc-per-node "$NPROC" --standalone \
  -m learner.bench "${common[@]}" --threads "$per_rank" --out "$dir/${NPROC}proc" \
  | tee "$dir/${NPROC}proc.log"

.venv/bin/python - "$dir" "$NPROC" "$THREADS" "$per_rank" <<'EOF' | tee "$OUT/$run.txt"
import json, sys
from pathlib import Path

d, nproc, threads, per_rank = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
runs = {}
for name in ("1proc", f"{nproc}proc"):
    (f,) = (d / name).glob("*.json")
    runs[name] = json.loads(f.read_text())
one = runs["1proc"]
cfg = one["config"]
print(
    f"{one['protocol']}  method={one['method']}  memory={one['memory']['size']}  "
    f"backbone={cfg['model']['backbone']}  epochs={cfg['optim']['epochs']} (min_steps 0)  "
    f"max_train_per_class={one['max_train_per_class']}  seed={one['seed']}  "
    f"device={one['machine']['device']}  cpu={one['machine']['cpu']}"
)
print(f"threads: 1 process x {threads}, {nproc} processes x {per_rank}")
print(f"{'run':>8} {'backend':>8} {'img/s':>8} {'train s':>8} {'wall s':>8} "
      f"{'avg acc':>8} {'last acc':>8} {'forget':>8}  acc per step")
for name, r in runs.items():
    m, steps = r["metrics"], r["steps"]
    dist = r.get("distributed") or {"world_size": 1, "backend": None}
    print(
        f"{name:>8} {str(dist['backend'] or '-'):>8} {r['train_images_per_second']:>8.0f} "
        f"{sum(s['train_seconds'] for s in steps):>8.1f} {r['wall_seconds']:>8.1f} "
        f"{m['avg_incremental_accuracy']:>8.2f} {m['last_accuracy']:>8.2f} "
        f"{m['forgetting'] if m['forgetting'] is not None else float('nan'):>8.2f}  "
        + " ".join(f"{a:.1f}" for a in r["cnn"]["accuracy_per_step"])
    )
two = runs[f"{nproc}proc"]
print(f"speed-up of training: {two['train_images_per_second'] / one['train_images_per_second']:.2f}x")
EOF
