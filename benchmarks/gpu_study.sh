#!/usr/bin/env bash
# The paper's CIFAR-10 study on one GPU in one call (issue 12): plain-20/ResNet-20 and plain-56/ResNet-56 on
# the full 64k-iteration schedule as two populations, beside the PyTorch reference trained on the same data
# with the same recipe, then the report (Fig. 6 panels, Table 6 with the reference's column) and the
# population throughput table.
#
#   TFDS_DATA_DIR=/path/to/tfds bash benchmarks/gpu_study.sh [OUTDIR] [MAX_S]
#
# The four jobs share the GPU at once (each alone leaves it mostly idle):
#   pop20   experiments/cifar10.py:resnet20, population.residual=0,1, population.seeds=$SEEDS20 (default 0,1)
#   pop56   experiments/cifar10.py:resnet56, population.residual=0,1, population.seeds=$SEEDS56 (default 0)
#   torch-resnet20, torch-resnet56   benchmarks/torch_train_check.py (seed 0)
# MAX_S (default 420) stops every job still running: resflax checkpoints and stops on SIGTERM, and rerunning
# this script with the same OUTDIR resumes the populations (the PyTorch reference starts over). Unfinished
# runs are reported as unfinished, never as the paper's schedule. SCALE (default 1.0, the paper) multiplies
# every step count, for a dry run on a CPU: SCALE=0.002 bash benchmarks/gpu_study.sh /tmp/study 600.
#
# OUTDIR gets study.log, summary.md (the table, wall times, the device's name) and study.tar.gz (report/,
# every run's config.json, metrics.jsonl and population.json; no checkpoints). Runs from the repository root
# with resflax importable (pip install -e . or PYTHONPATH=src); the reference needs torch.
set -uo pipefail
out=${1:-runs/gpu-study}
max_s=${2:-420}
scale=${SCALE:-1.0}
py=${PYTHON:-python3}
mkdir -p "$out"
log=$out/study.log
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false  # several processes share the GPU's memory
say() { echo "$*" | tee -a "$log"; }
quiet() { grep --line-buffered -v -E "^(WARNING|I0000|W0000)|Variant folder"; }

device=$($py -c "import jax; d = jax.devices()[0]; print(d.platform, d.device_kind)" 2>/dev/null)
say "device: $device; $($py -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__)" 2>/dev/null)"
say "torch: $($py -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo none)"
say "schedule_scale $scale, stop after $max_s s"

t0=$(date +%s)
common=(--config.progress=False --config.log_every_steps=500 --config.checkpoint_every_steps=4000
        --config.keep_checkpoints=1 --config.eval_every_steps=2000)
pids=()
for spec in "20 ${SEEDS20:-0,1}" "56 ${SEEDS56:-0}"; do
  set -- $spec
  timeout -s TERM -k 90 "$max_s" $py -m resflax.cli train --config=experiments/cifar10.py:resnet$1,schedule_scale=$scale \
    --config.population.residual=0,1 --config.population.seeds=$2 --workdir="$out/runs/pop$1" "${common[@]}" \
    > >(quiet | sed -u "s/^/[pop$1] /" >> "$log") 2>&1 &
  pids+=($!)
done
if $py -c "import torch" 2>/dev/null; then
  for m in resnet20 resnet56; do
    timeout -s TERM -k 30 "$max_s" $py benchmarks/torch_train_check.py --model $m --scale "$scale" --eval_every 2000 \
      --workdir "$out/runs/torch-$m" > >(grep --line-buffered -v '"split": "train"' | sed -u "s/^/[torch-$m] /" >> "$log") 2>&1 &
    pids+=($!)
  done
fi
for p in "${pids[@]}"; do wait "$p"; done
t1=$(date +%s)
say "training wall time (all jobs at once, including data decoding and compilation): $((t1 - t0)) s"

refs=()
for m in resnet20 resnet56; do [ -f "$out/runs/torch-$m/config.json" ] && refs+=("$out/runs/torch-$m"); done
$py -m resflax.cli report "$out/runs/pop20" "$out/runs/pop56" ${refs:+--reference "${refs[@]}"} --out "$out/report" \
  --dataset "CIFAR-10 (JPEG q75 copy, ../shared/tfds)" 2>&1 | quiet | tee -a "$log"

left=$((max_s - (t1 - t0)))
if [ -f benchmarks/population_throughput.py ] && [ "$left" -gt 60 ]; then
  timeout -s TERM "$left" $py benchmarks/population_throughput.py --model resnet20 --members 1,2,4,8 --vectorize vmap \
    --json "$out/throughput.json" --markdown 2>&1 | quiet | tee -a "$log"
fi

{
  echo "# CIFAR-10 study on one device: $device"
  echo
  echo "schedule_scale $scale ($( [ "$scale" = "1.0" ] && echo "the paper's 64k iterations" || echo "a SCALED schedule, not the paper's")); training wall time $((t1 - t0)) s with all jobs sharing the device; stopped after $max_s s at most."
  echo
  cat "$out/report/table6.md" 2>/dev/null
} > "$out/summary.md"
tar -czf "$out/study.tar.gz" -C "$out" report $(cd "$out" && find runs -name config.json -o -name metrics.jsonl \
  -o -name population.json | grep -v "/checkpoints") 2>/dev/null
cat "$out/summary.md"
