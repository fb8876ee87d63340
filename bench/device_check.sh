#!/usr/bin/env bash
# The CUDA checks of issue 16 in one call, for a lent GPU machine (the `device` tool runs it in the repo root):
#   1. tests/cuda: generation and gradients on CUDA vs the CPU (4 families x 3 budgets, SSN included), member-
#      parallel subset programs, the training loop on the GPU in fp32 (vs the CPU), bf16 + channels_last (the
#      checkpoint evaluated back on a CPU), torch.compile (inductor), materialised inference;
#   2. bench/bench_core.py on CUDA: fp32, bf16 (channels_last: the default), bf16 + torch.compile.
# Needs only what the GPU image has (torch, numpy, safetensors, scikit-learn, tqdm, pytest): core/ and ensemble/
# import neither Ray nor MLflow (import-linter holds that), so `superweights train` itself is not run there.
# Logs go to $OUT (the device tool's folder that comes back), else ./device-check. Each step has its own time
# limit, so one hang cannot eat the device time: 510 s at most, inside the device tool's 600 s a command.
# Dry run here: DEVICE=cpu bash bench/device_check.sh   (tests/cuda then skip; the benchmark runs on the CPU)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device-check}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
REPEATS=${REPEATS:-20}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
status=0

"$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')" | tee "$OUT/env.txt"

timeout 240 "$PY" -m pytest -q -ra -p no:cacheprovider tests/cuda 2>&1 | tee "$OUT/pytest.txt" || status=1

# (seconds allowed|flags)
for run in "60|" "60|--precision bf16" "150|--precision bf16 --compile"; do
    # shellcheck disable=SC2086
    timeout "${run%%|*}" "$PY" bench/bench_core.py --device "$DEVICE" --repeats "$REPEATS" --no-write ${run#*|} 2>&1 \
        | grep -v "^\s*$" | tee -a "$OUT/bench.txt" || status=1
done
echo "device_check: exit $status (logs in $OUT)"
exit $status
