#!/usr/bin/env bash
# Every GPU measurement that docs/BENCHMARKS.md asks for, in one script, so that a lent GPU machine (or
# your own) produces them all. Each part prints its table and writes JSON into OUT_DIR.
#
#   bash bench/gpu_suite.sh OUT_DIR                    # every part, an estimated 15-20 minutes on an H100
#   bash bench/gpu_suite.sh OUT_DIR tests ffn loss     # only the parts named
#
# Where one command may run 10 minutes at most, run it as three: "tests ffn loss", "train", "decode peers".
# The tests part needs pytest (python -m pip install pytest, or carry a wheel where there is no network).
#
# Parts: tests (the GPU tests: fused kernels, CUDA-graph decoding), ffn (SwiGLU activation kernels),
# loss (chunked cross-entropy), train (tokens/s and MFU per fast path, ~124M at seq 1024), decode
# (tokens/s and % of the bandwidth bound, ~110M and ~1.2B, eager vs CUDA graphs), peers (vs transformers).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash bench/gpu_suite.sh OUT_DIR [parts...]}
shift
parts=${*:-tests ffn loss train decode peers}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

for part in $parts; do
    echo "=== $part ==="
    case $part in
        tests)
            $python -c "import pytest" 2>/dev/null || { echo "the tests part needs pytest" >&2; exit 2; }
            $python -m pytest -q -rs tests/test_kernels.py tests/test_loss.py tests/test_fast_paths.py \
                tests/test_generation.py -k "cuda or gpu or triton or compiled" 2>&1 | tee "$out/tests.log"
            ;;
        ffn)
            $python bench/ffn.py --dim 4096 --tokens 8192 --json "$out/ffn.json"
            ;;
        loss)
            $python bench/loss.py --json "$out/loss.json"
            ;;
        train)
            # ~124M parameters: stories110m's shape (dim 768, 12 layers) with GPT-2's padded vocabulary.
            $python bench/train_throughput.py --preset stories110m --vocab-size 50304 --seq-len 1024 \
                --batch-size 16 --variants plain compiled default compiled+chunked-loss \
                compiled+swiglu-triton --json "$out/train_124m.json"
            $python bench/train_throughput.py --preset stories15m --seq-len 256 --batch-size 64 \
                --variants plain default --json "$out/train_15m.json"
            ;;
        decode)
            $python bench/decode.py --preset stories110m llama3.2-1b --compile both --new-tokens 256 \
                --json "$out/decode.json"
            ;;
        peers)
            $python bench/vs_transformers.py --device cuda --preset stories110m --json "$out/peers.json"
            ;;
        *)
            echo "unknown part $part (tests, ffn, loss, train, decode, peers)" >&2
            exit 2
            ;;
    esac
done
