#!/usr/bin/env bash
# The one GPU check (H100/H200, at most 8 minutes): CUDA tests, then the real-size benchmarks, all output under $OUT.
#   bash benchmarks/fetch_wheels.sh            # here: the wheels the GPU image lacks -> .whl/
#   bash benchmarks/device_check.sh            # there, in the checkout with .whl/ beside it
# Writes $OUT/pytest_gpu.log, perf_ablation.log, gpu_train.log, generation.log, codec.log, preprocess.log, env.txt
# and RESULT.json (every benchmark's RESULT lines, by name). Without CUDA it stops at once: the 2B-parameter runs
# never start on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}
mkdir -p "$OUT"
if ! python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "device_check: no CUDA device here; nothing was run (this check is for a GPU machine)" >&2
    exit 2
fi
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/moss-site .whl/*.whl \
        || { echo "device_check: installing .whl/ failed" >&2; exit 3; }
    export PYTHONPATH=/tmp/moss-site:${PYTHONPATH:-}
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import sys, torch, transformers, lightning, peft; print(sys.version.split()[0], 'torch', torch.__version__, \
'cudnn', torch.backends.cudnn.version(), 'transformers', transformers.__version__, 'lightning', lightning.__version__, \
'peft', peft.__version__)"
} 2>&1 | tee "$OUT/env.txt"

status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, remember failures
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || status=1
}
# Limits add up to 470 s (7.8 min); every benchmark prints a RESULT line per case, so a time-out loses only the
# case in progress (the ablation's compiled stage, last, compiles in its warm-up).
step pytest_gpu 90 python3 -m pytest -m gpu -p no:cacheprovider -q -rA -s tests/gpu
step perf_ablation 170 python3 benchmarks/perf_ablation.py --samples 24
step gpu_train 45 python3 benchmarks/gpu_train.py --samples 24 --only "packed varlen_sdpa ckpt=off" \
    "padded bs4 sdpa ckpt=on"
step generation 90 python3 benchmarks/generation.py --device cuda --sizes real --seconds 10 --batch 1 32
step codec 40 python3 benchmarks/codec.py --device cuda --clips 16 --seconds 10 --batch 1 16 --passes 2
step preprocess 35 python3 benchmarks/preprocess.py --files 48 --seconds 20 --workers 15 --encoder cuda

python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
results = {}
for name in ("perf_ablation", "gpu_train", "generation", "codec", "preprocess"):
    log = out / f"{name}.log"
    lines = [l for l in log.read_text().splitlines() if l.startswith("RESULT ")] if log.exists() else []
    results[name] = [json.loads(l[7:]) for l in lines] or None  # per case, then the summary (if it finished)
(out / "RESULT.json").write_text(json.dumps(results, indent=1))
print("RESULT " + json.dumps({k: v is not None for k, v in results.items()}))
PY
exit $status
