"""Peak memory per process of training steps: one process, DDP, FSDP, and each with activation checkpointing.

    flock /tmp/llama_mini_cpu.lock python bench/parallel_memory.py            # CPU, gloo, 2 processes
    python bench/parallel_memory.py --device cuda --processes 8 --preset llama3-8b --seq-len 8192 ...

Each setting runs `--steps` optimizer steps of llama_mini's own Trainer (the same set-up, sharding and
loss as train.py) on a synthetic corpus, under torchrun when it has several processes. What is measured:

    CPU    the peak resident memory of each process during the steps only: the kernel's high-water mark
           (VmHWM) is reset after the set-up (writing 5 to /proc/self/clear_refs), so the corpus, the
           tokenizer and FSDP's one-time broadcast of the initial weights from the main process are left
           out; the resident size at that moment (weights, and for FSDP their pieces) is shown beside it.
           It counts everything the process holds: Python, PyTorch's libraries (the "alone, empty"
           row, a process that has built nothing). glibc is given a fixed mmap threshold
           (MALLOC_MMAP_THRESHOLD_=65536), so that freed tensors leave the resident size at once.
    CUDA   torch.cuda.max_memory_allocated, reset after the set-up the same way.

With --preset, pass --tokenizer with that preset's vocabulary (Llama 2's tokenizer.model for llama2-7b,
...): a run's vocabulary is its tokenizer's. The table shows the largest value over the processes. The
defaults (dim 768, 12 layers, 85M parameters; 2 sequences of 256 tokens per process) make the weights,
gradients and AdamW state (16 bytes per parameter, 1.3 GiB) and the activations (about 0.4 GiB, as
`python -m llama_mini inspect` counts them) large next to the ~0.4 GiB of the interpreter. AdamW's
moments appear at the first step, so the peak is that of the second: weights, moments, activations, and
gradients growing as backward frees activations.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from bench.timing import print_table, run_info  # noqa: E402

SETTINGS = {  # name -> (processes: None = --processes, flags)
    "alone": (1, []),
    "alone + checkpointing": (1, ["--activation-checkpointing"]),
    "DDP": (None, ["--parallel", "ddp"]),
    "DDP + checkpointing": (None, ["--parallel", "ddp", "--activation-checkpointing"]),
    "FSDP": (None, ["--parallel", "fsdp"]),
    "FSDP + checkpointing": (None, ["--parallel", "fsdp", "--activation-checkpointing"]),
}


def _resident_bytes(field: str) -> int:
    """VmRSS or VmHWM of this process, in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # the high-water mark becomes the current size


def _peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _resident_bytes("VmHWM")


def _now(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else _resident_bytes("VmRSS")


def worker(options: argparse.Namespace, flags: list[str]) -> None:
    """One process of a setting: build the Trainer, reset the peak, run the steps, report as JSON."""
    from llama_mini.model.args import ModelArgs
    from llama_mini.train import TrainConfig, Trainer
    from llama_mini.train.command import build_parser

    given = vars(build_parser().parse_args(flags))
    model_fields = {field for field in ModelArgs.__dataclass_fields__}
    model = {name: value for name, value in given.items() if name in model_fields}
    skipped = model_fields | {"resume", "config"}
    train = {name: value for name, value in given.items() if name not in skipped}
    if options.empty:  # the interpreter and PyTorch's libraries, before anything is built
        trainer = None
        device = torch.device(options.device if options.device != "auto" else "cpu")
    else:
        trainer = Trainer(TrainConfig(**train), model, show_progress=False)
        device = trainer.device
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every process has finished its set-up (FSDP's broadcast included)
    after_setup = _now(device)
    _reset_peak(device)
    started = time.perf_counter()
    for step in range(options.steps if trainer else 0):
        trainer.train_step(step)
    seconds = (time.perf_counter() - started) / max(options.steps, 1)
    report = {"rank": int(os.environ.get("RANK", 0)), "peak": _peak(device), "after_setup": after_setup,
              "seconds_per_step": seconds}  # fmt: skip
    (Path(options.results) / f"{report['rank']}.json").write_text(json.dumps(report))


def corpus(folder: Path) -> tuple[Path, Path]:
    """(text documents from a small grammar, no download, enough tokens for any window here; a
    400-token tokenizer trained on them once, for every setting)."""
    from llama_mini.tokenizer import train_tokenizer

    rng = random.Random(0)
    words = (
        ["the king", "a fool", "my lord", "the queen", "this knight"],
        ["speaks of", "fights for", "waits for", "dreams of"],
        ["the crown", "a rose", "the storm", "sweet music", "his honour"],
    )
    documents = folder / "corpus"
    documents.mkdir(parents=True, exist_ok=True)
    texts = []
    for index in range(40):
        texts.append("\n".join(" ".join(rng.choice(choices) for choices in words) + "." for _ in range(400)))
        (documents / f"doc{index:02d}.txt").write_text(texts[-1])
    train_tokenizer(texts, folder / "tokenizer.model", vocab_size=400)
    return documents, folder / "tokenizer.model"


def run_setting(name: str, processes: int, flags: list[str], options: argparse.Namespace) -> dict:
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--standalone"]
    results = Path(tempfile.mkdtemp())
    extra = ["--empty"] if name == "alone, empty" else []
    command = [*launcher, __file__, "--worker", "--results", str(results), "--steps", str(options.steps)]
    command += [*extra, "--", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // processes))}
    if options.device == "cpu":
        # glibc raises its mmap threshold as large blocks are freed, after which freed tensors stay in
        # the process's heap and the resident size stops following what PyTorch holds; a fixed threshold
        # keeps every block of 64 KiB or more in its own mapping, returned when freed.
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-4000:]}")
    reports = [json.loads(path.read_text()) for path in results.glob("*.json")]
    shutil.rmtree(results)
    mib = 2**20
    return {
        "setting": name,
        "processes": processes,
        "peak per process in the steps (MiB)": max(r["peak"] for r in reports) / mib,
        "after set-up (MiB)": max(r["after_setup"] for r in reports) / mib,
        "s/step": max(r["seconds_per_step"] for r in reports),
    }


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2, help="processes for DDP and FSDP (default: 2)")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per process)")
    parser.add_argument("--preset", help="a model preset instead of the default shape")
    parser.add_argument(
        "--tokenizer",
        help="a tokenizer with the preset's vocabulary (a run's vocabulary is its tokenizer's: without it "
        "the embedding and output matrices have the synthetic corpus's 400 rows)",
    )
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--n-layers", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-per-process", type=int, default=2, help="sequences per process per step")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--settings", nargs="+", default=["alone, empty", *SETTINGS], help="which rows")
    parser.add_argument("--json", help="also write the rows and run info to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--empty", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--results", help=argparse.SUPPRESS)
    options, rest = parser.parse_known_args()
    if options.worker:
        worker(options, rest[1:] if rest[:1] == ["--"] else rest)
        return

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        data, tokenizer = corpus(scratch)
        tokenizer = options.tokenizer or tokenizer
        model = ["--preset", options.preset] if options.preset else ["--dim", str(options.dim),
                 "--n-layers", str(options.n_layers), "--n-heads", str(options.dim // 64)]  # fmt: skip
        rows = []
        for name in options.settings:
            processes, flags = SETTINGS.get(name, (1, []))
            processes = options.processes if processes is None else processes
            batch = options.batch_per_process * processes
            common = ["--data", str(data), "--tokenizer", str(tokenizer), "--device", options.device,
                      "--batch-size", str(batch), "--max-seq-len", str(options.seq_len),
                      "--out", str(scratch / name.replace(" ", "-").replace(",", "")),
                      "--data-dir", str(scratch / "data"), "--sample-tokens", "0", *model]  # fmt: skip
            rows.append(run_setting(name, processes, [*common, *flags], options))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    info = run_info(torch.device(options.device))
    print(f"device {info['device']}, {info['date']}, commit {info['commit']}, torch {info['torch']}")
    print_table(rows)
    if options.json:
        Path(options.json).write_text(json.dumps({"info": info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
