# Sourced by the scripts that run a series of learner.bench runs (scripts/recipe_sweep.sh,
# scripts/balance_runs.sh). They set OUT and COMMON (the flags every run shares), then
# `run NAME FLAGS...` writes OUT/NAME/<result>.json and OUT/NAME.txt, and skips a run whose
# OUT/NAME.done exists, so a series cut short by the end of a session resumes where it was;
# within a run of several orders, --resume keeps the orders whose result files landed.
# The whole learner.bench command is the same for every run but NAME's flags.
run() {
  local name=$1; shift
  [ -f "$OUT/$name.done" ] && return 0
  mkdir -p "$OUT/$name"
  .venv/bin/python -m learner.bench "${COMMON[@]}" --resume --out "$OUT/$name" "$@" | tee -a "$OUT/$name.txt"
  touch "$OUT/$name.done"
}
