#!/usr/bin/env bash
# The one GPU check: run once on a machine with a CUDA GPU, after the project's own install
# (pip install -e .); needs no network. 8 minutes at most (each step has a time limit):
#   1. svhn.bench on cuda: resnet18 and resnet50, bf16, channels-last; model alone against
#      end to end with the augmentation on the CPU and on the device, the host-to-device
#      copy, predict (a synthetic set it generates);
#   2. with real data (SVHN_DATA_DIR=<competition folder>), the real-data recipe on the GPU
#      (configs/gpu_full.yaml) in a 3-minute time budget (its 40 epochs on an H200), timed,
#      then the gated zoom search against the full one on val with that checkpoint;
#   3. one summary: $OUT/gpu_check.json and $OUT/gpu_check.md.
# Usage: [SVHN_DATA_DIR=data/mchar] [OUT=gpu_check] scripts/gpu_check.sh
# python3 throughout: GPU images often have no plain `python`. What it measured on an H200:
# docs/performance.md.
set -euo pipefail
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
python3 - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device visible to torch; run it on a GPU machine.")
print("gpu_check on", torch.cuda.get_device_name(0), "torch", torch.__version__, flush=True)
PY
start=$(date +%s)
timeout 180 python3 -m svhn.bench --device cuda --backbones resnet18 resnet50 \
    --precision bf16-mixed --channels_last --augment zoom --batch_size 256 --max_batches 10 \
    --repeats 2 --synthetic_dir "$OUT/bench_synthetic" --json --out "$OUT/bench.json" \
    > /dev/null 2> "$OUT/bench.txt"  # the JSON to the file, the table to bench.txt
bench_s=$(( $(date +%s) - start ))
fit_s=""; ckpt=""
if [ -n "${SVHN_DATA_DIR:-}" ] && [ -d "$SVHN_DATA_DIR/mchar_train" ]; then
    start=$(date +%s)
    timeout 240 python3 -m svhn.fit --config configs/real_cpu.yaml --config configs/gpu_full.yaml \
        --data.data_dir "$SVHN_DATA_DIR" --time_budget.minutes 3 \
        --trainer.logger.init_args.save_dir "$OUT/runs" --trainer.logger.init_args.name gpu_check \
        > "$OUT/fit.log" 2>&1
    fit_s=$(( $(date +%s) - start ))
    ckpt=$(ls -t "$OUT"/runs/gpu_check/version_*/checkpoints/epoch*.ckpt | head -1)
    timeout 60 python3 -m svhn.bench --search "$ckpt" --data_dir "$SVHN_DATA_DIR" --split val \
        --device cuda --json --out "$OUT/search.json" > /dev/null 2> "$OUT/search.txt"
fi
BENCH_S=$bench_s FIT_S=$fit_s CKPT=$ckpt python3 - "$OUT" <<'PY'
import json, os, sys
from pathlib import Path
out = Path(sys.argv[1])
summary = {"bench": json.loads((out / "bench.json").read_text()),
           "bench_seconds": int(os.environ["BENCH_S"])}
lines = ["# svhn GPU check", "", f"bench: {summary['bench_seconds']} s"]
if os.environ.get("FIT_S"):
    summary["fit_seconds"] = int(os.environ["FIT_S"])
    summary["checkpoint"] = os.environ["CKPT"]
    summary["fit_summary"] = [line for line in (out / "fit.log").read_text().splitlines()
                              if line.startswith(("Precision:", "Trained", "Best"))]
    summary["search"] = json.loads((out / "search.json").read_text())
    lines.append(f"real-data recipe on the GPU (3-minute budget): {summary['fit_seconds']} s "
                 f"for the command (checkpoint {Path(summary['checkpoint']).name})")
    lines += summary["fit_summary"]
    for run in summary["search"]["search"]:
        lines.append(f"val: full search {run['full']['images_per_s']:.0f} images/s score "
                     f"{run['full']['score']:.3f}; gated {run['gated']['images_per_s']:.0f} "
                     f"images/s score {run['gated']['score']:.3f}")
else:
    lines.append("real-data recipe: not run (set SVHN_DATA_DIR to the competition folder)")
lines += ["", "```", (out / "bench.txt").read_text().strip(), "```"]
if (out / "search.txt").is_file():
    lines += ["", "```", (out / "search.txt").read_text().strip(), "```"]
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
(out / "gpu_check.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines[:6]))
print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
PY
