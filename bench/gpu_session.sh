#!/usr/bin/env bash
# Every GPU check and benchmark of BENCHMARKS.md's "still to measure" list, in few device calls.
#
# Here (a machine with pip access to the locked wheels), once:
#     bash bench/gpu_session.sh fetch-wheels        # the packages the GPU image lacks -> .whl/ (git-ignored)
# On the GPU machine (the device tool's `run`, carrying .whl), one phase per call, each well under 10 minutes:
#     bash bench/gpu_session.sh tests               # CUDA tests: packed FlexAttention, a bf16 trainer step
#     bash bench/gpu_session.sh curation            # SSCD descriptors and ViT-H/14 embedding vs naive; exact k-NN
#     bash bench/gpu_session.sh train               # DINOv2 step: ViT-S/B/L img/s, memory, MFU vs naive
# Each phase writes its log and JSON under $OUT (or ./gpu-out when OUT is unset). Record the numbers, with the
# date and the device line they print, in BENCHMARKS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
phase="${1:-}"
out="${OUT:-gpu-out}"
mkdir -p "$out"

# the GPU image has torch, timm, pyarrow, numpy, pillow, scikit-learn, pytest; these travel as wheels (Python 3.12)
WHEELS=(pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
        webdataset==0.2.111 braceexpand==0.1.7 ImageHash==4.3.2 PyWavelets==1.9.0 faiss-cpu==1.15.1)

if [[ "$phase" == fetch-wheels ]]; then
    grep -qx '/.whl/' .gitignore || echo '/.whl/' >> .gitignore
    exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
fi

if [[ -d .whl ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the carried wheels failed"; exit 1; }
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"

case "$phase" in
tests)
    python3 -m pytest -q -p no:cacheprovider -o addopts= tests/training/test_train_packed.py \
        tests/training/test_train_losses.py tests/training/test_train_vit.py tests/training/test_train_optim.py \
        2>&1 | tee "$out/tests.log"
    ;;
curation)
    python3 bench/sscd_bench.py 2>&1 | tee "$out/sscd.log"
    python3 bench/embed_bench.py --out "$out/embed.json" 2>&1 | tee "$out/embed.log"
    ;;
train)
    python3 bench/train_throughput.py --arch vit_small_patch14 vit_base_patch14 vit_large_patch14 --batch 64 \
        --out "$out/train.json" 2>&1 | tee "$out/train.log"
    python3 bench/train_throughput.py --arch vit_large_patch14 --batch 64 --compile --no-baseline \
        --out "$out/train_compiled.json" 2>&1 | tee "$out/train_compiled.log"
    python3 bench/train_data_bench.py --workers 4 8 14 --out "$out/data.json" 2>&1 | tee "$out/data.log"
    ;;
*)
    echo "usage: bash bench/gpu_session.sh fetch-wheels | tests | curation | train" >&2
    exit 2
    ;;
esac
