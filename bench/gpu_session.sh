#!/usr/bin/env bash
# One call for a session with a lent GPU (H200): parity of the Triton paths, the kernel variants against the
# defaults at real sizes, the quality benchmark at GPU scale (at most QUALITY_TIMEOUT s, default 180), the
# benchmark grid with every variant side by side with sparsify, and the per-kernel profiles. Everything goes under
# $OUT (default ./gpu-out). Runs from the repository root with the image's python3
# (no install of the project needed).
#
# The lent image (torch 2.11 + CUDA, triton 3.6) lacks sparsify and its pure-Python dependencies and has no
# network. Prepare them on a machine with network, inside the repository, then carry the folder with the run:
#     bench/gpu_session.sh --download gpu_wheels        # wheels for Python 3.12 (GPU_PYTHON=3.x for another)
# and on the GPU machine:
#     WHEELS=gpu_wheels bench/gpu_session.sh            # (device tool: carry ["gpu_wheels"])
# Budget: about 9-12 minutes on an H200 (the grid dominates); QUICK=1 runs a smaller grid (about 6 minutes), which
# fits a 10-minute call.
set -u

SPARSIFY_WHEELS="eai-sparsify==1.3.3 einops==0.8.2 natsort==8.4.0 schedulefree==1.4.1 simple-parsing==0.1.9
docstring-parser==0.18.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19"
VARIANTS="topk=triton;topk=triton-bitonic;scatter=dot;topk=triton,scatter=dot"

if [ "${1:-}" = "--download" ]; then
    dest="${2:?usage: bench/gpu_session.sh --download DIR}"
    mkdir -p "$dest"
    # shellcheck disable=SC2086
    # for the GPU image's Python (3.12 on the lent H200; multiprocess ships one wheel per Python version)
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version "${GPU_PYTHON:-3.12}" \
        --dest "$dest" $SPARSIFY_WHEELS
fi

OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
step() { echo "[gpu_session $(date -u +%H:%M:%S)] $*" | tee -a "$OUT/session.log"; }

step "environment"
{ nvidia-smi; "$PY" -c "import torch, triton, sys; print(sys.version); print('torch', torch.__version__, 'cuda',
torch.version.cuda, torch.cuda.get_device_name(0)); print('triton', triton.__version__)"; git log -1 --oneline; } \
    > "$OUT/environment.txt" 2>&1

if [ -n "${WHEELS:-}" ]; then
    step "installing the carried wheels from $WHEELS (--no-deps)"
    "$PY" -m pip install --no-deps --no-index "$WHEELS"/*.whl > "$OUT/pip.txt" 2>&1 || step "pip failed: see pip.txt"
fi

step "parity: torch-eager and torch-triton, fp32 and bf16"
"$PY" -m parity --paths torch-eager,torch-triton > "$OUT/parity.txt" 2>&1; echo "exit $?" >> "$OUT/parity.txt"

step "kernel variants against the defaults at real sizes (bench.gpu_check)"
"$PY" -m bench.gpu_check --out "$OUT/gpu_check.json" > "$OUT/gpu_check.txt" 2>&1

step "quality at GPU scale (bench.quality --scale gpu, synthetic): ours, sparsify, the previous AuxK default"
timeout "${QUALITY_TIMEOUT:-180}" "$PY" -m bench.quality --scale gpu --no-real --device cuda \
    --variant "exact-auxk-10M:auxk_raise_only=false,dead_feature_threshold=10000000" \
    --out "$OUT/quality-gpu" > "$OUT/quality-gpu.txt" 2>&1; echo "exit $?" >> "$OUT/quality-gpu.txt"

if [ "${QUICK:-0}" = "1" ]; then
    GRID=(--d-in 768 --k 32 --tokens 4096)
else
    GRID=(--d-in 768,2048 --k 32,128 --tokens 4096,16384)
fi
step "benchmark grid ${GRID[*]}: ours, sparsify and the variants $VARIANTS"
"$PY" -m bench --device cuda --no-mlx --no-kernels "${GRID[@]}" --reps 10 --variants "$VARIANTS" \
    --out "$OUT/bench" > "$OUT/bench.txt" 2>&1

step "profiles: d768 M24576 k32 N4096 (launch-bound) and d2048 M65536 k64 N16384 (the issue's large config)"
"$PY" -m bench --device cuda --profile-only --d-in 768 --k 32 --tokens 4096 --dead-frac 0.05,0 \
    --variants "$VARIANTS" --out "$OUT/profile-d768" > "$OUT/profile-d768.txt" 2>&1
"$PY" -m bench --device cuda --profile-only --d-in 2048 --k 64 --tokens 16384 --variants "$VARIANTS" \
    --out "$OUT/profile-d2048" > "$OUT/profile-d2048.txt" 2>&1

step "done: $OUT"
ls -la "$OUT" | tee -a "$OUT/session.log"
