"""train.py and generate.py as a user runs them on a device, each against its plain path (issue 30, item 1).

    python bench/gpu_check.py --out /tmp/check                         # the default device (a GPU if any)
    python bench/gpu_check.py --out /tmp/check --data corpus.txt --steps 300 --json check.json

Four commands, each in a new process, as a user would type them:

    train.py --max-steps N ...                          the device's defaults (on CUDA: bf16 autocast,
                                                        compiled blocks, fused AdamW, SDPA's choice)
    train.py --max-steps N ... --dtype fp32 --no-compile --no-fused-adamw --swiglu-kernel eager
        --loss-chunk-size 0 --attention math            the plain paths, same seed and data
    generate.py --checkpoint BEST --temperature 0 ...  eager decoding of the first run's model
    generate.py --checkpoint BEST ... --compile       compiled (CUDA graphs on a GPU)

It prints a table and says whether each pair agrees: the two runs' last validation losses within
--loss-rtol (bf16 against float32 after N steps; 2% by default), and the two generations' texts identical
(both float32, greedy). Flags after `--` go to both train.py commands (a model shape, --batch-size, ...).
The exit status is 1 when a pair disagrees, so a script can stop on it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from bench.timing import print_table, run_info, write_json  # noqa: E402
from llama_mini.runtime import resolve_device  # noqa: E402

PLAIN_FLAGS = ["--dtype", "fp32", "--no-compile", "--no-fused-adamw", "--swiglu-kernel", "eager",
               "--loss-chunk-size", "0", "--attention", "math"]  # fmt: skip


def run(command: list[str]) -> tuple[str, str, float]:
    """Run a command; its stdout, stderr and wall seconds. A failure ends the check with its output."""
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {' '.join(command)}\n{result.stdout}\n{result.stderr}")
    return result.stdout, result.stderr, time.perf_counter() - started


def last_evaluation(out: Path) -> dict:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluations = [record for record in records if record["type"] == "eval"]
    trains = [record for record in records if record["type"] == "train"]
    return {**evaluations[-1], "tokens_per_second": trains[-1]["tokens_per_second"]}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--out", required=True, help="folder for the runs (created)")
    parser.add_argument("--data", default="shakespeare", help="corpus for both runs")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of each run")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--new-tokens", type=int, default=100, help="tokens each generation adds")
    parser.add_argument("--prompt", default="ROMEO:")
    parser.add_argument(
        "--loss-rtol", type=float, default=0.02, help="how far the last val losses may differ"
    )
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    out = Path(args.out)
    device = resolve_device(args.device)

    python = sys.executable
    common = ["--data", args.data, "--max-steps", str(args.steps), "--eval-interval", str(args.steps),
              "--sample-tokens", "0", "--device", args.device, *extra]  # fmt: skip
    rows = []
    for name, flags in (("defaults", []), ("plain", PLAIN_FLAGS)):
        stdout, stderr, seconds = run([python, "train.py", *common, *flags, "--out", str(out / name)])
        how = next((line for line in (stdout + stderr).splitlines() if "fast paths:" in line), "")
        evaluation = last_evaluation(out / name)
        rows.append({"command": f"train.py ({name})", "val_loss": evaluation["val_loss"],
                     "val_bpb": evaluation["val_bpb"], "tokens/s": evaluation["tokens_per_second"],
                     "wall s": seconds, "how": how.strip()})  # fmt: skip
    losses = [row["val_loss"] for row in rows]
    losses_agree = abs(losses[0] - losses[1]) <= args.loss_rtol * losses[1]

    texts = []
    for name, flags in (("eager", []), ("compiled", ["--compile"])):
        command = [python, "generate.py", "--checkpoint", str(out / "defaults" / "best"),
                   "--prompt", args.prompt, "--temperature", "0", "--dtype", "fp32",
                   "--max-new-tokens", str(args.new_tokens), "--device", args.device, *flags]  # fmt: skip
        stdout, stderr, seconds = run(command)
        texts.append(stdout)
        rows.append({"command": f"generate.py ({name})", "val_loss": "", "val_bpb": "", "tokens/s": "",
                     "wall s": seconds, "how": f"{len(stdout)} characters, greedy, fp32"})  # fmt: skip
    texts_agree = texts[0] == texts[1]

    info = run_info(device)
    print(f"{info['device']}, commit {info['commit']}, {args.steps} steps of {args.data}")
    print_table(rows)
    print(f"last val losses agree within {args.loss_rtol:.0%}: {'yes' if losses_agree else 'NO'}")
    print(f"eager and compiled greedy generations identical: {'yes' if texts_agree else 'NO'}")
    write_json(args.json, {**info, "args": vars(args), "extra": extra, "rows": rows,
                           "losses_agree": losses_agree, "texts_agree": texts_agree})  # fmt: skip
    return 0 if losses_agree and texts_agree else 1


if __name__ == "__main__":
    sys.exit(main())
