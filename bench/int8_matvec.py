"""One eager int8 linear layer at batch 1 on a CPU: the ways torch offers, beside the float32 product.

    python bench/int8_matvec.py                  # the stories110m shape's three matrix sizes, 2 threads

Why llama_mini.ops.quantize writes Int8Linear out as F.linear(x, q.to(x.dtype)) * scale rather than calling
a library kernel: what counts is the compiled decode step (bench/decode_cpu.py), where that form is fused;
this script checks what the eager alternatives cost, each called on one (1, K) row:

    fp32 F.linear                the float32 layer (the baseline)
    Int8Linear (ours)            int8 weights converted to float32 on every call, then F.linear
    _weight_int8pack_mm          torch's int8 weight-only kernel (aten), the scales applied inside
    torchao int8 weight-only     torchao's Int8WeightOnlyConfig on an nn.Linear (if torchao is installed)

Each is the median of --calls calls, the variants taking turns call by call. Run it under
`flock /tmp/llama_bench.lock` on a shared machine.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.timing import print_table  # noqa: E402
from llama_mini.ops.quantize import Int8Linear  # noqa: E402


def variants(linear: nn.Linear) -> dict[str, object]:
    ours = Int8Linear.from_linear(linear)
    found = {
        "fp32 F.linear": linear,
        "Int8Linear (ours)": ours,
        "_weight_int8pack_mm": lambda x: torch.ops.aten._weight_int8pack_mm(x, ours.weight, ours.scales),
    }
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        return found
    wrapper = nn.Sequential(copy.deepcopy(linear))
    quantize_(wrapper, Int8WeightOnlyConfig())
    found["torchao int8 weight-only"] = wrapper
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for k, n in ((768, 768), (768, 2048), (2048, 768)):  # wq/wo, w1/w3, w2 of stories110m
        torch.manual_seed(0)
        linear = nn.Linear(k, n, bias=False).eval()
        x = torch.randn(1, k)
        runs = variants(linear)
        expected = linear(x)
        times: dict[str, list[float]] = {name: [] for name in runs}
        with torch.inference_mode():
            for run in runs.values():
                torch.testing.assert_close(run(x), expected, rtol=0.05, atol=0.05)  # the same layer
                for _ in range(10):
                    run(x)
            for _ in range(args.calls):
                for name, run in runs.items():
                    start = time.perf_counter()
                    run(x)
                    times[name].append(time.perf_counter() - start)
        baseline = statistics.median(times["fp32 F.linear"])
        for name in runs:
            median = statistics.median(times[name])
            rows.append(
                {
                    "K x N": f"{k} x {n}" if name == "fp32 F.linear" else "",
                    "variant": name,
                    "us per call": 1e6 * median,
                    "speed vs fp32": f"{baseline / median:.2f}x",
                }
            )
    print(
        f"torch {torch.__version__}, {args.threads} threads, batch 1, load average {os.getloadavg()[0]:.2f}"
    )
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
