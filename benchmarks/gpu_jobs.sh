#!/usr/bin/env bash
# Runs independent jobs side by side on one multi-GPU machine (the small-model evaluation of issue 5, which
# is too long for one 10-minute call in one process). Job i gets GPU i mod (number of GPUs), an equal share
# of the CPU threads, its own cache root /tmp/gpu_jobs/i (corpora and models are rebuilt per job: seconds
# and a minute) and its own folder $OUT/job<i>; {root} and {out} in a job stand for those two. Every job is
# stopped after LIMIT seconds (default 540) so that the logs are always packed into $OUT/logs.tgz, and only
# the JSON results stay beside them (the device tool brings back at most 8 files).
#
#   OUT=/tmp/o benchmarks/gpu_jobs.sh \
#     "python3 benchmarks/eval_membership.py --size small --device cuda --root {root} --out {out} --scenarios pretrain-scenes" \
#     "python3 benchmarks/choose_recipes.py --size small --device cuda --root {root} --out {out}"
set -u
: "${OUT:?set OUT to the results folder}"
gpus=$(nvidia-smi -L | wc -l)
threads=$(( $(nproc) / $# > 0 ? $(nproc) / $# : 1 ))
i=0
for job in "$@"; do
  root=/tmp/gpu_jobs/$i; out=$OUT/job$i
  mkdir -p "$root" "$out"
  cmd=${job//\{root\}/$root}; cmd=${cmd//\{out\}/$out}
  echo "job$i on GPU $((i % gpus)), $threads threads: $cmd"
  CUDA_VISIBLE_DEVICES=$((i % gpus)) OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads PYTHONUNBUFFERED=1 \
    timeout "${LIMIT:-540}" bash -c "$cmd" > "$OUT/job$i.log" 2>&1 &
  i=$((i + 1))
done
status=0
for pid in $(jobs -p); do wait "$pid" || status=1; done
cd "$OUT" && tar czf logs.tgz job*.log job*/*.md 2>/dev/null; rm -f job*.log job*/*.md
for i in $(seq 0 $((i - 1))); do echo "--- job$i"; tar xzOf logs.tgz "job$i.log" | grep -v "it/s\]" | tail -n 8; done
exit $status
