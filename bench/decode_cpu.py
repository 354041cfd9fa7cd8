"""Greedy decoding on a CPU: llama_mini beside transformers and llama.cpp, the same weights, one process.

    python bench/decode_cpu.py                          # stories260k, stories15m and stories110m shapes
    python bench/decode_cpu.py --preset stories15m --profile       # also where llama_mini's time goes
    python bench/decode_cpu.py --one-shot --json decode_cpu.json   # also `llama-mini generate`'s wall time

On a machine shared with other jobs, run it under `flock /tmp/llama_mini_cpu.lock` (the lock the other
CPU benchmarks here take), so that they take turns.

For each model shape (a preset, with --vocab-size 4096 by default, or "preset" for the preset's own):
random weights are saved once as a checkpoint folder (which transformers loads) and exported to an f32
GGUF file (which llama.cpp loads, through llama-cpp-python), so every engine decodes the same numbers.
Each engine then continues the same prompt by a fixed number of new tokens, greedily, at batch 1 in
float32, never stopping at eos:

    llama_mini eager       llama_mini.generation.generate(..., temperature=0)
    llama_mini compiled    the same with compile=True: the decode step compiled ahead of time by
                           AOTInductor (llama_mini.ops.aot_step), built once into a compile cache
    transformers           LlamaForCausalLM.generate(do_sample=False), its default dynamic cache
    llama.cpp              Llama.eval of the prompt, then argmax and eval of one token at a time

and, when named in --engines, the same weights stored in 8 or 4 bits:

    llama_mini int8 eager / compiled    `quantize(model, "int8")` (llama_mini.ops.quantize): int8 weights
                                        with a scale per output channel, the output layer in float32
    llama_mini int4 eager / compiled    `quantize(model, "int4", --group-size)`: int4 weights two a byte
                                        with a scale and zero per group of inputs, the output layer in float32
    llama.cpp q8_0                      the GGUF file written with q8_0 matrices (blocks of 32 int8
                                        weights with one float16 scale), the output layer included

llama.cpp runs with its CPU backend's extra weight layouts off (`use_extra_bufts=False`): llama-cpp-python
0.3.36's AMX kernels crash on q8_0 files on Intel Xeons with AMX (tests/test_gguf.py); the portable kernels
(AVX-512 / AVX2) read the same bytes.

The time of one call covers the prompt's prefill and every new token, as a user waits for it; tokens/s is
new tokens / that time, the median of 3 calls after warm-up (compiling happens in warm-up), the engines
taking turns call by call (see `interleaved_medians`). All engines
get the same thread count (--threads, default every core). "agree" counts the leading new tokens equal
to llama_mini eager's: the engines compute the same function, so they should agree on all of them, up to
a near-tie that float rounding breaks differently. llama.cpp is skipped, with a note, when
llama-cpp-python is not installed. The time to build the compiled step (its first call) is printed apart.

--one-shot also times what a user waits for from the shell: a fresh `python generate.py` process that
loads the checkpoint and prints --new-tokens greedy tokens after the prompt "Once": eager (--no-compile);
with no compile flag and an empty compile cache (the default, which then decodes eagerly); with --compile
and the empty cache (it builds the step and saves it); with --compile again (it loads the saved step); and
with no flag again (the default, which now loads it too). Each is the median of --one-shot-repeats runs,
except the build, run once.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import random
import re
import statistics
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.timing import print_table, run_info, write_json  # noqa: E402
from llama_mini import DataError, Transformer, get_preset  # noqa: E402
from llama_mini.checkpoint import save_pretrained  # noqa: E402
from llama_mini.checkpoint.gguf import sentencepiece_vocab, write_gguf  # noqa: E402
from llama_mini.generation import generate  # noqa: E402
from llama_mini.ops import aot_step  # noqa: E402
from llama_mini.ops.quantize import quantize  # noqa: E402
from llama_mini.tokenizer import train_tokenizer  # noqa: E402

ENGINES = (
    "llama_mini eager",
    "llama_mini compiled",
    "transformers",
    "llama.cpp",
    "llama_mini int8 eager",
    "llama_mini int8 compiled",
    "llama.cpp q8_0",
    "llama_mini int4 eager",
    "llama_mini int4 compiled",
)
DEFAULT_ENGINES = ENGINES[:4]  # the quantized engines when asked for (--engines)
FIRST_CALL_REPORTED = ("llama_mini compiled", "llama_mini int8 compiled", "llama_mini int4 compiled")
REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The CPU's model name as lscpu prints it (from /proc/cpuinfo), or the platform's processor."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def spread_weights_(model: Transformer, seed: int) -> Transformer:
    """Seeded weights whose logits differ by far more than float rounding, so that every engine's
    argmax is the same token (with the default N(0, 0.02) init the logits nearly tie): matrices
    N(0, 1/in_features), embeddings N(0, 1), norm weights 1 + N(0, 0.1). Speed does not depend on them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 1:
                param.copy_(1.0 + 0.1 * noise)
            elif name == "tok_embeddings.weight":
                param.copy_(noise)
            else:
                param.copy_(noise / math.sqrt(param.shape[1]))
    return model.eval()


def interleaved_medians(
    runs: dict[str, Callable[[], list[int]]], warmup: dict[str, int], repeats: int = 3
) -> dict[str, tuple[float, list[int]]]:
    """Median wall time of each engine's call, and the tokens of its last call.

    After each engine's untimed warm-up calls, the timed calls go round the engines in turn (A B C D,
    A B C D, ...) instead of one engine's calls in a row: on a machine shared with other jobs, a burst of
    someone else's work then slows one call of every engine, not all calls of one, and the median and
    the ratios hold.
    """
    for name, run in runs.items():
        for call in range(warmup.get(name, 1)):
            start = time.perf_counter()
            run()
            if call == 0 and name in FIRST_CALL_REPORTED:
                print(f"  {name}: first call (builds the compiled step) {time.perf_counter() - start:.1f} s")
    times: dict[str, list[float]] = {name: [] for name in runs}
    tokens: dict[str, list[int]] = {}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            tokens[name] = run()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), tokens[name]) for name in runs}


def llama_mini_engine(
    model: Transformer, prompt: list[int], new_tokens: int, compile: bool, compile_cache: Path | None = None
):
    return lambda: generate(
        model, [prompt], new_tokens, temperature=0, compile=compile, compile_cache=compile_cache
    )[0]


def transformers_engine(folder: Path, prompt: list[int], new_tokens: int):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    input_ids = torch.tensor([prompt])

    def run() -> list[int]:
        with torch.inference_mode():
            out = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,  # never stop early
                max_length=None,
                eos_token_id=None,
                pad_token_id=0,
            )
        return out[0, len(prompt) :].tolist()

    return run


def portable_llama(llama_cpp, **options):
    """`llama_cpp.Llama(**options)` with its CPU backend's extra weight layouts off: llama-cpp-python
    0.3.36's AMX kernels (Intel Xeons since Sapphire Rapids) crash the process on q8_0 files, a fault of that
    build, not of the file; the portable kernels read the same bytes. Llama() takes no model parameter for
    the extra layouts, so the function it reads its defaults from is swapped while it loads."""
    default_params = llama_cpp.llama_cpp.llama_model_default_params

    def portable_params():
        params = default_params()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = portable_params
    try:
        return llama_cpp.Llama(**options)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = default_params


def llama_cpp_engine(gguf_path: Path, prompt: list[int], new_tokens: int, threads: int, kv_cache: str):
    """llama.cpp's greedy loop through llama-cpp-python's low-level calls, or None if it is not installed.

    kv_cache: the keys' and values' storage, "f32" (as every other engine here) or "f16" (llama.cpp's
    default, which reads half the bytes per cached position)."""
    try:
        import llama_cpp
    except ImportError:
        return None
    cache_type = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16}[kv_cache]
    model = portable_llama(
        llama_cpp,
        model_path=str(gguf_path),
        n_ctx=len(prompt) + new_tokens,
        n_batch=max(len(prompt), 1),
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=False,
        type_k=cache_type,
        type_v=cache_type,
        verbose=False,
    )

    vocab_size = model.n_vocab()

    def last_logits() -> np.ndarray:
        # The logits of the last position evaluated, read in place from llama.cpp's buffer (without
        # logits_all, llama-cpp-python itself keeps no copy).
        pointer = llama_cpp.llama_get_logits_ith(model.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(vocab_size,))

    def run() -> list[int]:
        model.reset()  # an empty KV cache: every call prefills the prompt again, as the others do
        model.eval(prompt)
        tokens = []
        for _ in range(new_tokens):
            tokens.append(int(np.argmax(last_logits())))
            model.eval(tokens[-1:])
        return tokens

    return run


def tokenizer_for(vocab_size: int, folder: Path):
    """A SentencePiece tokenizer with `vocab_size` pieces, trained on made-up words (the engines are fed token
    ids, but the one-shot command decodes every id it samples, so each must have a piece); one of 300
    pieces where that many cannot be learned from the made-up text (GGUF pads it to the vocabulary)."""
    rng = random.Random(0)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(6000)]
    text = "\n".join(" ".join(rng.choices(words, k=12)) for _ in range(6000))
    try:
        return train_tokenizer([text], folder / f"tokenizer-{vocab_size}.model", vocab_size=vocab_size)
    except DataError:
        return train_tokenizer([text], folder / "tokenizer-300.model", vocab_size=300)


def agreement(tokens: list[int], reference: list[int]) -> int:
    """How many leading tokens are equal."""
    count = 0
    for ours, theirs in zip(tokens, reference, strict=False):
        if ours != theirs:
            break
        count += 1
    return count


def profile_decode(model: Transformer, prompt: list[int], new_tokens: int, rows: int = 12) -> None:
    """Where eager decoding spends its time: torch.profiler's top operators, in microseconds per token."""
    from torch.profiler import ProfilerActivity, profile

    generate(model, [prompt], new_tokens, temperature=0)  # warm up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        generate(model, [prompt], new_tokens, temperature=0)
        seconds = time.perf_counter() - start
    events = sorted(prof.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)
    total = sum(event.self_cpu_time_total for event in events)
    print(
        f"\nprofile, llama_mini eager: {1e6 * seconds / new_tokens:,.0f} us per new token "
        f"({1e6 * seconds / new_tokens - total / new_tokens:,.0f} of it outside operators, i.e. Python)"
    )
    table = [
        {
            "operator": event.key,
            "calls per token": event.count / new_tokens,
            "us per token": event.self_cpu_time_total / new_tokens,
            "% of operator time": 100 * event.self_cpu_time_total / total,
        }
        for event in events[:rows]
    ]
    print_table(table)


def profile_compiled(model: Transformer, prompt: list[int], new_tokens: int, compile_cache: Path) -> None:
    """Where compiled decoding spends its time: the whole call per new token, the compiled step alone (the
    same step called in a loop, its KV cache as full as at the request's midpoint), and the difference (the
    prefill, reading each token back, the loop's Python)."""
    from llama_mini.generation import decode, steps

    run = llama_mini_engine(model, prompt, new_tokens, compile=True, compile_cache=compile_cache)
    run()  # built in the warm-up already: this loads nothing new
    calls = []
    for _ in range(5):
        start = time.perf_counter()
        run()
        calls.append(time.perf_counter() - start)
    per_token = statistics.median(calls) / new_tokens
    length = len(prompt) + new_tokens
    made_cache = steps.ensure_cache(model, 1, length, static=True)
    example = (torch.zeros((1, 1), dtype=torch.long), torch.tensor(0))
    step = aot_step.saved_step(decode.decode_step, model, example, compile_cache)
    position = torch.tensor(len(prompt) + new_tokens // 2)
    steps = []
    try:
        with torch.inference_mode(), step.bound_to(model) as run_step:
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(new_tokens):
                    run_step(example[0], position)
                steps.append((time.perf_counter() - start) / new_tokens)
    finally:
        if made_cache:
            model.clear_cache()
    step_time = statistics.median(steps)
    print(
        f"\nprofile, llama_mini compiled: {1e6 * per_token:,.0f} us per new token: {1e6 * step_time:,.0f} in "
        f"the compiled step, {1e6 * (per_token - step_time):,.0f} around it (prefill, reading the token, "
        f"the loop)"
    )


def one_shot_times(
    folder: Path, shape: str, new_tokens: int, threads: int, repeats: int, compile_cache: Path
) -> list[dict[str, object]]:
    """Wall time of a fresh `python generate.py` process printing new_tokens greedy tokens, with and without
    a saved compiled step (the variants are in the module docstring)."""
    command = [
        sys.executable,
        str(REPO / "generate.py"),
        "--checkpoint",
        str(folder),
        "--prompt",
        "Once",  # BOS and one or two pieces: fits beside the new tokens in the context of every shape here
        "--max-new-tokens",
        str(new_tokens),
        "--temperature",
        "0",
        "--verbose",
        "--no-stream",
        "--compile-cache",
        str(compile_cache),
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}

    def wall_time(flags: list[str]) -> tuple[float, str]:
        start = time.perf_counter()
        finished = subprocess.run([*command, *flags], capture_output=True, text=True, env=environment)
        seconds = time.perf_counter() - start
        if finished.returncode != 0:
            raise RuntimeError(f"{' '.join(command + flags)} failed:\n{finished.stderr}")
        return seconds, finished.stderr

    runs = {
        "generate.py --no-compile (eager)": ["--no-compile"],
        "generate.py, empty compile cache (default: eager)": [],
        "generate.py --compile, empty compile cache (builds the step)": ["--compile"],
        "generate.py --compile, step saved (loads it)": ["--compile"],
        "generate.py, step saved (default: loads it)": [],
    }
    rows = []
    for index, (name, flags) in enumerate(runs.items()):
        if "empty" in name and compile_cache.exists():
            for path in compile_cache.iterdir():
                path.unlink()
        times, report = [], ""
        for _ in range(1 if "builds" in name else repeats):
            seconds, report = wall_time(flags)
            times.append(seconds)
        decoded = re.search(
            r"decode: \d+ tokens in [\d.]+ s \(([\d.,]+) tokens/s\); (\d+) new tokens", report
        )
        rows.append(
            {
                "shape": shape if index == 0 else "",
                "command": name,
                "wall s": statistics.median(times),
                "new tokens": int(decoded.group(2)) if decoded else "?",
                "decode tok/s (its --verbose)": float(decoded.group(1).replace(",", "")) if decoded else "?",
            }
        )
        print(f"  {name}: {statistics.median(times):.2f} s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", nargs="+", default=["stories260k", "stories15m", "stories110m"])
    parser.add_argument(
        "--vocab-size", default="4096", help="vocabulary of every shape: a number, or 'preset' for its own"
    )
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="for every engine alike")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(DEFAULT_ENGINES))
    parser.add_argument(
        "--group-size", type=int, default=128, help="the int4 engines' inputs per scale and zero"
    )
    parser.add_argument(
        "--llama-cpp-kv-cache", choices=["f32", "f16"], default="f32", help="f16 is llama.cpp's own default"
    )
    parser.add_argument("--profile", action="store_true", help="also profile llama_mini's decoding")
    parser.add_argument(
        "--compile-cache",
        default=None,
        help="where llama_mini keeps its compiled steps (default: a new temporary folder: they are built)",
    )
    parser.add_argument("--one-shot", action="store_true", help="also time fresh generate.py processes")
    parser.add_argument("--one-shot-repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]  # other jobs on the machine: a busy one slows every engine unevenly
    notes = []
    rows = []
    one_shot_rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        compile_cache = Path(args.compile_cache) if args.compile_cache else scratch / "compiled"
        for preset in args.preset:
            overrides = {"max_seq_len": args.prompt_len + args.new_tokens}
            if args.vocab_size != "preset":
                overrides["vocab_size"] = int(args.vocab_size)
            model_args = get_preset(preset, **overrides)
            torch.manual_seed(0)
            model = spread_weights_(Transformer(model_args), seed=0)
            folder, gguf_path = scratch / preset, scratch / f"{preset}.gguf"
            tokenizer = tokenizer_for(model_args.vocab_size, scratch)
            save_pretrained(model, folder, tokenizer_path=tokenizer.model_path)
            write_gguf(model, gguf_path, sentencepiece_vocab(tokenizer.model_path), "f32")
            if "llama.cpp q8_0" in args.engines:
                q8_path = scratch / f"{preset}-q8_0.gguf"
                write_gguf(model, q8_path, sentencepiece_vocab(tokenizer.model_path), "q8_0")
            quantized = {
                scheme: quantize(copy.deepcopy(model), scheme, args.group_size)
                for scheme in ("int8", "int4")
                if any(engine.startswith(f"llama_mini {scheme}") for engine in args.engines)
            }
            prompt = torch.randint(
                3, model_args.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(1)
            ).tolist()
            millions = sum(p.numel() for p in model.parameters()) / 1e6
            shape = (
                f"{preset} (dim {model_args.dim}, {model_args.n_layers} layers, "
                f"vocab {model_args.vocab_size}, {millions:.1f}M)"
            )

            engines: dict[str, Callable[[], list[int]] | None] = {}
            for engine in args.engines:
                if engine == "llama_mini eager":
                    engines[engine] = llama_mini_engine(model, prompt, args.new_tokens, compile=False)
                elif engine == "llama_mini compiled":
                    engines[engine] = llama_mini_engine(
                        model, prompt, args.new_tokens, compile=True, compile_cache=compile_cache
                    )
                elif engine.startswith(("llama_mini int8", "llama_mini int4")):
                    compiled = engine.endswith("compiled")
                    cache = compile_cache if compiled else None
                    engines[engine] = llama_mini_engine(
                        quantized[engine.split()[1]], prompt, args.new_tokens, compiled, cache
                    )
                elif engine == "transformers":
                    engines[engine] = transformers_engine(folder, prompt, args.new_tokens)
                else:
                    engines[engine] = llama_cpp_engine(
                        q8_path if engine == "llama.cpp q8_0" else gguf_path,
                        prompt,
                        args.new_tokens,
                        args.threads,
                        args.llama_cpp_kv_cache,
                    )
                    if engines[engine] is None:
                        notes.append("llama.cpp skipped: pip install llama-cpp-python to include it")
            runnable = {engine: run for engine, run in engines.items() if run is not None}
            results = interleaved_medians(
                runnable, warmup=dict.fromkeys(FIRST_CALL_REPORTED, 2)
            )  # compiling: call 1
            for engine, (seconds, _) in results.items():
                print(f"{preset}: {engine} {args.new_tokens / seconds:,.0f} tok/s", flush=True)

            reference = results.get("llama_mini eager", next(iter(results.values())))[1]
            speeds = {engine: args.new_tokens / seconds for engine, (seconds, _) in results.items()}
            for index, (engine, (_, tokens)) in enumerate(results.items()):
                row = {"shape": shape if index == 0 else "", "engine": engine, "tok/s": speeds[engine]}
                for peer in ("llama.cpp", "transformers", "llama.cpp q8_0", "llama_mini compiled"):
                    row[f"vs {peer}"] = f"{speeds[engine] / speeds[peer]:.2f}x" if peer in speeds else "-"
                row["agree"] = f"{agreement(tokens, reference)}/{args.new_tokens}"
                rows.append(row)
            if args.profile:
                profile_decode(model, prompt, args.new_tokens)
                if "llama_mini compiled" in results:
                    profile_compiled(model, prompt, args.new_tokens, compile_cache)
            if args.one_shot and tokenizer.vocab_size < model_args.vocab_size:
                notes.append(f"{preset}: no one-shot times (no tokenizer of {model_args.vocab_size} pieces)")
            elif args.one_shot:
                one_shot_rows += one_shot_times(
                    folder, shape, args.new_tokens, args.threads, args.one_shot_repeats, scratch / "one-shot"
                )

    info = run_info(torch.device("cpu"))
    versions = f"torch {torch.__version__}"
    for package in ("transformers", "llama_cpp"):
        try:
            versions += f", {package} {__import__(package).__version__}"
        except ImportError:
            pass
    print(
        f"\n{cpu_model()}, {args.threads} threads for every engine; fp32, batch 1, greedy, "
        f"{args.prompt_len}-token prompt + {args.new_tokens} new tokens; llama.cpp KV cache "
        f"{args.llama_cpp_kv_cache}; {versions}; "
        f"commit {info['commit']}, {info['date']}; 1-minute load average {load_before:.2f} before the run, "
        f"{os.getloadavg()[0]:.2f} after it (the run itself adds up to {args.threads})"
    )
    for note in dict.fromkeys(notes):
        print(f"note: {note}")
    print_table(rows)
    if one_shot_rows:
        print(f"\nOne-shot command, a fresh process each (median of {args.one_shot_repeats}, cold: once):")
        print_table(one_shot_rows)
    settings = {
        "cpu": cpu_model(),
        "threads": args.threads,
        "llama_cpp_kv_cache": args.llama_cpp_kv_cache,
        "load_average": [load_before, os.getloadavg()[0]],
    }
    write_json(args.json, {**info, **settings, "results": rows, "one_shot": one_shot_rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
