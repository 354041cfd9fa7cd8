#!/usr/bin/env bash
# Every GPU measurement that docs/BENCHMARKS.md asks for, in one script, so that a lent GPU machine (or
# your own) produces them all. Each part prints its table and writes JSON into OUT_DIR.
#
#   bash bench/gpu_suite.sh OUT_DIR                    # every part, an estimated 20-25 minutes on an H100
#   bash bench/gpu_suite.sh OUT_DIR tests check        # only the parts named
#
# In order of value (issue 30). Where one command may run 10 minutes at most, run it as three or four:
# "tests check", "train", "decode ffn loss", "serve peers". The tests part needs pytest, and serve needs
# FastAPI, uvicorn and httpx (`pip install -e .[serve]`); carry wheels where there is no network. On a
# machine with no internet, put a corpus in the tree and set CORPUS to it (default: shakespeare, which is
# downloaded on first use).
#
# Parts: tests (tests/test_devices.py's checks on CUDA, then the GPU-only tests: fused kernels, CUDA-graph
# decoding), check (train.py with the CUDA defaults against the plain paths, generate.py compiled against
# eager: bench/gpu_check.py), train (tokens/s and MFU per fast path, ~124M at seq 1024), decode (tokens/s
# and % of the bandwidth bound, ~110M and ~1.2B, eager vs CUDA graphs, bf16, int8 and int4 weights),
# ffn (SwiGLU activation kernels), loss (chunked cross-entropy), serve (llama-mini serve at 1, 8 and 64
# clients), peers (vs transformers).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash bench/gpu_suite.sh OUT_DIR [parts...]}
shift
parts=${*:-tests check train decode ffn loss serve peers}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

for part in $parts; do
    echo "=== $part ==="
    case $part in
        tests)
            $python -c "import pytest" 2>/dev/null || { echo "the tests part needs pytest" >&2; exit 2; }
            $python -m pytest -q -rs tests/test_devices.py 2>&1 | tee "$out/tests_devices.log"
            $python -m pytest -q -rs tests/test_kernels.py tests/test_loss.py tests/test_fast_paths.py \
                tests/test_generation.py -k "cuda or gpu or triton or compiled" 2>&1 | tee "$out/tests.log"
            ;;
        check)
            $python bench/gpu_check.py --out "$out/check" --data "${CORPUS:-shakespeare}" --steps 300 \
                --json "$out/check.json"
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
            $python bench/decode.py --preset llama3.2-1b --quantize int8 int4 --compile both \
                --batch-sizes 1 --new-tokens 256 --json "$out/decode_quantized.json"
            ;;
        serve)
            $python bench/serve.py --preset stories110m --clients 1 8 64 --device cuda --dtype bf16 \
                --servers llama_mini "llama_mini compiled" --json "$out/serve.json"
            ;;
        peers)
            $python bench/vs_transformers.py --device cuda --preset stories110m --json "$out/peers.json"
            ;;
        *)
            echo "unknown part $part (tests, check, train, decode, ffn, loss, serve, peers)" >&2
            exit 2
            ;;
    esac
done
