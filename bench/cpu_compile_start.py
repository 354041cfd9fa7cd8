"""What a CPU run's first compiled step waits for: inductor's instruction-set checks, then the blocks' code.

    python bench/cpu_compile_start.py            # the demo's step (bf16 autocast, blocks compiled)

Each arm runs in a new process with an empty compile cache (TORCHINDUCTOR_CACHE_DIR in a temporary
folder), as a machine's first compiled run does:

- inductor: inductor checks the vector instruction sets itself, one after another, when the first step
  asks (`torch._inductor.cpu_vec_isa.valid_vec_isa_list`, timed apart here, then the step);
- together: `llama_mini.ops.fast_paths.check_cpu_instruction_sets` runs the same checks side by side in a
  thread, as train.py starts them while its data are prepared (timed here without that overlap).

Each arm prints the checks' seconds and the first step's seconds after them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing


def arm(mode: str) -> dict:
    """In this process (with an empty cache): the checks as `mode` runs them, then the first step."""
    from torch._inductor import cpu_vec_isa

    from bench.demo_step_cost import make_step
    from llama_mini.ops.fast_paths import check_cpu_instruction_sets

    started = time.perf_counter()
    if mode == "together":
        check_cpu_instruction_sets().join()
    picked = cpu_vec_isa.pick_vec_isa()  # inductor's own question (answered from its cache if checked)
    checks = time.perf_counter() - started
    step, _ = make_step("dtype:bf16,compile:1")
    started = time.perf_counter()
    step()
    return dict(mode=mode, isa=str(picked), checks_s=checks, first_step_s=time.perf_counter() - started)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--arm":
        print(json.dumps(arm(sys.argv[2])))
        return
    print("| arm | instruction set picked | checks s | first step after them s | both s |")
    print("|---|---|--:|--:|--:|")
    for mode in ("inductor", "together"):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            out = subprocess.run([sys.executable, __file__, "--arm", mode], env=env, check=True,
                                 capture_output=True, text=True).stdout  # fmt: skip
        result = json.loads(out.strip().splitlines()[-1])
        total = result["checks_s"] + result["first_step_s"]
        seconds = [f"{value:.1f}" for value in (result["checks_s"], result["first_step_s"], total)]
        print("| " + " | ".join([mode, result["isa"], *seconds]) + " |")


if __name__ == "__main__":
    main()
