"""The benchmark scripts run end to end (tiny sizes, CPU) and write the results they print.

They are not tests of speed: they keep the scripts that bench/gpu_suite.sh runs on a lent GPU from breaking
unnoticed, since GPU time is scarce. torch.compile runs with the "aot_eager" backend here (dynamo and
autograd tracing, but no C++ compiler), which keeps each script to seconds.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_training import synthetic_corpus

from bench import (
    data_prep,
    decode,
    decode_ab,
    decode_cpu,
    demo_step_cost,
    ffn,
    gpu_check,
    profile_cpu,
    serve,
    tracking_overhead,
    train_throughput,
    vs_transformers,
)
from llama_mini import Transformer, get_preset
from llama_mini.ops.aot_step import cpp_compiler_available
from llama_mini.ops.quantize import quantize
from llama_mini.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def quick_compile(monkeypatch):
    real_compile = torch.compile

    def compile_without_codegen(function=None, **options):
        options.pop("mode", None)  # "reduce-overhead" (CUDA graphs) means nothing to aot_eager
        options["backend"] = "aot_eager"
        return real_compile(function, **options) if function is not None else real_compile(**options)

    monkeypatch.setattr(torch, "compile", compile_without_codegen)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def results(path: Path) -> list[dict]:
    payload = json.loads(path.read_text())
    assert payload["commit"] and payload["date"] and payload["torch"] == torch.__version__
    return payload["results"]


def test_train_throughput_times_every_named_variant(tmp_path, quick_compile):
    variants = ["plain", "default", "compiled+chunked-loss", "eager+swiglu-compiled", "eager+attention-math"]
    argv = [
        "--preset",
        "tiny",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--steps",
        "1",
        "--variants",
        *variants,
    ]
    assert train_throughput.main([*argv, "--json", str(tmp_path / "train.json")]) == 0
    rows = results(tmp_path / "train.json")
    assert [row["variant"] for row in rows] == variants
    assert all(row["tok/s"] > 0 for row in rows)
    assert (
        "loss_chunk_size=1024" in rows[2]["fast paths"] and "swiglu_kernel=compiled" in rows[3]["fast paths"]
    )


def test_train_throughput_refuses_an_unknown_variant():
    with pytest.raises(SystemExit, match="unknown fast path 'fused-everything'"):
        train_throughput.main(["--preset", "tiny", "--variants", "compiled+fused-everything"])


def test_decode_bench_reports_eager_and_compiled_at_each_batch_size(tmp_path, quick_compile):
    argv = ["--preset", "tiny", "--batch-sizes", "1", "2", "--prompt-len", "4", "--new-tokens", "4"]
    assert decode.main([*argv, "--compile", "both", "--json", str(tmp_path / "decode.json")]) == 0
    rows = results(tmp_path / "decode.json")
    assert [(row["mode"], row["batch"]) for row in rows] == [
        ("eager", 1),
        ("eager", 2),
        ("compiled", 1),
        ("compiled", 2),
    ]


def test_decode_bench_counts_the_bytes_of_quantized_weights():
    """The bandwidth bound reads each weight in the bytes it is stored in: int8 layers a quarter of float32's
    (plus one scale per row); the embedding table is looked up, not read."""
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny"))
    step = decode.bytes_per_decode_step(model, batch=1, context=0, dtype=torch.float32)
    matrices = sum(
        p.numel() for name, p in model.named_parameters() if name.startswith("layers") and p.dim() == 2
    )
    rows = sum(
        p.shape[0] for name, p in model.named_parameters() if name.startswith("layers") and p.dim() == 2
    )
    assert step == 4 * (sum(p.numel() for p in model.parameters()) - model.tok_embeddings.weight.numel())
    int8_step = decode.bytes_per_decode_step(quantize(model, "int8"), batch=1, context=0, dtype=torch.float32)
    assert step - int8_step == 4 * matrices - (matrices + 4 * rows)


def test_ffn_bench_times_each_activation_kernel(tmp_path, quick_compile, monkeypatch):
    monkeypatch.setattr(ffn, "keep_freed_memory_in_the_heap", lambda: None)  # malloc settings stay the tests'
    assert (
        ffn.main(["--dim", "64", "--multiple-of", "16", "--tokens", "32", "--json", str(tmp_path / "f.json")])
        == 0
    )
    names = [row["what"] for row in results(tmp_path / "f.json")]
    assert any("kernel 'compiled'" in name for name in names)
    assert any(name.startswith("FeedForward") for name in names)


def test_vs_transformers_prints_ratios_for_both_llama_mini_paths(tmp_path, quick_compile, capsys):
    pytest.importorskip("transformers")
    argv = [
        "--preset",
        "tiny",
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--prompt-len",
        "4",
        "--new-tokens",
        "4",
    ]
    assert vs_transformers.main([*argv, "--decode-batches", "1", "--json", str(tmp_path / "peers.json")]) == 0
    rows = results(tmp_path / "peers.json")
    assert [row["measurement"].split(",")[0] for row in rows] == ["training step", "greedy decode"]
    for row in rows:
        assert row["transformers"].endswith("(1.00x)")
        assert {"llama_mini plain", "llama_mini fast"} <= set(row)


def test_decode_ab_bench_times_two_checkouts_in_turn_on_the_same_tokens(capsys):
    argv = [
        "--before",
        str(REPO),
        "--after",
        str(REPO),
        "--preset",
        "tiny",
        "--modes",
        "eager",
        "--rounds",
        "1",
    ]
    assert decode_ab.main([*argv, "--prompt-len", "2", "--new-tokens", "4"]) == 0
    rows = [
        line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny")
    ]
    assert len(rows) == 1 and rows[0][1].strip() == "eager"
    assert float(rows[0][-1]) > 0  # after / before, of one checkout against itself


def test_loss_bench_runs_each_variant_in_its_own_process(tmp_path):
    command = [sys.executable, "bench/loss.py", "--tokens", "64", "--dim", "16", "--vocab", "128"]
    command += ["--chunk-sizes", "16", "--json", str(tmp_path / "loss.json")]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, timeout=600)
    rows = results(tmp_path / "loss.json")
    assert len(rows) >= 3  # plain, plain compiled, chunked ...
    losses = {round(row["loss"], 4) for row in rows}
    assert len(losses) == 1  # every variant computes the same loss


def test_gpu_suite_script_is_valid_bash_and_refuses_an_unknown_part(tmp_path):
    script = REPO / "bench" / "gpu_suite.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    finished = subprocess.run(
        ["bash", str(script), str(tmp_path), "nonsense"], capture_output=True, text=True
    )
    assert finished.returncode == 2 and "unknown part nonsense" in finished.stderr


@pytest.mark.slow
@pytest.mark.skipif(
    not cpp_compiler_available(), reason="generate.py --compile builds a step with a C++ compiler"
)
def test_gpu_check_runs_train_and_generate_both_ways_and_finds_them_agreeing(tmp_path, monkeypatch):
    """bench/gpu_check.py end to end on the CPU: two 6-step train.py runs (the defaults, the plain paths)
    and two greedy generations (eager, compiled), compared and written out."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = synthetic_corpus(documents=8)
    for index, text in enumerate(texts):
        (corpus / f"doc{index}.txt").write_text(text)
    train_tokenizer(texts, tmp_path / "tokenizer.model", vocab_size=300)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the compiled step, kept out of ~/.cache
    out = tmp_path / "check.json"
    argv = ["--out", str(tmp_path / "runs"), "--data", str(corpus), "--steps", "6", "--device", "cpu",
            "--new-tokens", "8", "--json", str(out), "--", "--tokenizer", str(tmp_path / "tokenizer.model"),
            "--dim", "32", "--n-layers", "1", "--n-heads", "2", "--max-seq-len", "16", "--batch-size", "2",
            "--eval-steps", "1"]  # fmt: skip
    assert gpu_check.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["losses_agree"] and report["texts_agree"]
    commands = [row["command"] for row in report["rows"]]
    assert commands == [
        "train.py (defaults)",
        "train.py (plain)",
        "generate.py (eager)",
        "generate.py (compiled)",
    ]
    defaults, plain = report["rows"][:2]
    assert defaults["val_loss"] > 0 and defaults["tokens/s"] > 0 and "attention math" in plain["how"]


def test_decode_cpu_bench_runs_every_engine_on_the_same_weights(tmp_path, quick_compile, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    out = tmp_path / "decode_cpu.json"
    argv = ["--preset", "tiny", "--vocab-size", "512", "--prompt-len", "4", "--new-tokens", "6"]
    assert decode_cpu.main([*argv, "--json", str(out)]) == 0
    rows = results(out)
    engines = [row["engine"] for row in rows]
    assert engines[:3] == ["llama_mini eager", "llama_mini compiled", "transformers"]
    assert all(row["agree"] == "6/6" for row in rows)  # every engine decoded the same greedy tokens
    if "llama.cpp" not in engines:
        assert "llama.cpp skipped" in capsys.readouterr().out


def test_profile_bench_splits_a_training_step_and_times_both_products(tmp_path):
    out = tmp_path / "profile.json"
    argv = ["--preset", "tiny", "--batch-size", "2", "--seq-len", "16", "--steps", "1", "--plain"]
    assert profile_cpu.main(["train", *argv, "--json", str(out)]) == 0
    parts = [row["part"] for row in results(out)]
    assert parts == ["matmul", "attention", "other", "matmul rate"]
    shares = [float(row["share of operator time"].rstrip("%")) for row in results(out)[:3]]
    assert 98 <= sum(shares) <= 102 and shares[0] > 0  # every operator counted once, the products found
    assert profile_cpu.main(["matvec", "--preset", "tiny", "--json", str(out)]) == 0
    assert [row["rows"] for row in results(out)] == [1, 8]


def test_data_prep_times_the_tokenizing_step_alone_for_each_worker_count(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"Paragraph {i}: the fox {i % 13} ran to the river.\n\n" for i in range(3000)))
    argv = ["--tokenize-only", "--corpus", str(corpus), "--workers", "1", "2", "--repeats", "1"]
    argv += [
        "--vocab-size",
        "300",
        "--lock",
        "none",
        "--work",
        str(tmp_path),
        "--json",
        str(tmp_path / "d.json"),
    ]
    assert data_prep.main(argv) == 0
    rows = results(tmp_path / "d.json")
    assert [row["workers"] for row in rows] == [1, 2] and all(row["tokenize MB/s"] > 0 for row in rows)
    assert "tokenizing alone: 2 workers / 1 worker = " in capsys.readouterr().out


@pytest.mark.slow
def test_serve_bench_measures_each_server_at_each_client_count(tmp_path):
    pytest.importorskip("uvicorn")
    pytest.importorskip("gguf")
    out = tmp_path / "serve.json"
    argv = ["--preset", "tiny", "--vocab-size", "512", "--clients", "1", "2", "--requests-per-client", "2"]
    argv += ["--new-tokens", "4", "--prompt-tokens", "4", "--threads", "1", "--servers", "llama_mini"]
    assert serve.main([*argv, "--json", str(out)]) == 0
    rows = results(out)
    assert [(row["server"], row["clients"]) for row in rows] == [("llama_mini", 1), ("llama_mini", 2)]
    assert [row["tokens"] for row in rows] == [2 * 4, 2 * 2 * 4]  # greedy on spread weights: no early eos
    assert rows[0]["x 1 client"] == 1.0 and rows[1]["tokens/s"] > 0
    assert 0 < rows[1]["TTFT p50 (s)"] <= rows[1]["TTFT p95 (s)"]


@pytest.mark.slow
def test_tracking_overhead_times_runs_with_and_without_tensorboard(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.chdir(REPO)
    path = tmp_path / "tracking.json"
    argv = ["--steps", "4", "--log-interval", "2", "--repeats", "1", "--dim", "32", "--n-layers", "1"]
    assert tracking_overhead.main([*argv, "--json", str(path)]) == 0
    rows = results(path)
    assert [row["--log"] for row in rows] == ["none", "tensorboard"]
    assert rows[0]["vs none (end to end)"] == 1.0
    assert rows[1]["ms / step in dashboard calls"] > 0 and rows[1]["once per run, s"] > 0
    assert tracking_overhead.trainer_module.Dashboards is tracking_overhead.tracking.Dashboards  # restored


def test_optimizer_sweep_and_demo_speedrun_run_and_report(tmp_path):
    """bench/optimizer_sweep.py (run, then report with its figure) and bench/demo_speedrun.py, at a tiny
    size: AdamW and Muon runs share the first run's tokenizer and shards, and the reports read them."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index in range(6):
        (corpus / f"doc{index}.txt").write_text(f"the king {index} speaks of the crown and the storm.\n" * 60)
    tiny = ["--data", str(corpus), "--vocab-size", "300", "--dim", "32", "--n-layers", "1", "--n-heads", "2",
            "--multiple-of", "16", "--max-seq-len", "32", "--batch-size", "2", "--eval-steps", "1"]  # fmt: skip
    sweep = [sys.executable, "bench/optimizer_sweep.py"]
    out = tmp_path / "sweep"
    run = ["run", "--out", str(out), "--adamw-lrs", "2e-3", "--muon-lrs", "0.01", "--seeds", "0"]
    subprocess.run(
        [*sweep, *run, "--max-steps", "4", "--eval-interval", "2", "--", *tiny], cwd=REPO, check=True
    )
    assert (out / "tokenizer.model").exists()
    figure = tmp_path / "sweep.png"
    report = subprocess.run([*sweep, "report", "--out", str(out), "--figure", str(figure)], cwd=REPO,
                            check=True, capture_output=True, text=True)  # fmt: skip
    rows = [line for line in report.stdout.splitlines() if line.startswith("| default |")]
    assert [row.split(" | ")[1:3] for row in rows] == [["adamw", "0.002"], ["muon", "0.01"]]
    # the by-step table: the last evaluation's bits per byte are the first table's, their gap Muon's minus AdamW's
    finals = [float(row.split(" | ")[4].split(" ± ")[0]) for row in rows]
    assert "| step | adamw 0.002: bits/byte | s | muon 0.01: bits/byte | s | muon - adamw |" in report.stdout
    last = next(line for line in report.stdout.splitlines() if line.startswith("| 4 |")).split(" | ")
    assert [float(last[1]), float(last[3])] == finals
    assert float(last[5].split(" ± ")[0]) == pytest.approx(finals[1] - finals[0], abs=2e-4)
    assert figure.read_bytes().startswith(b"\x89PNG")
    speedrun = [sys.executable, "bench/demo_speedrun.py", "--seeds", "0", "--baseline-steps", "4",
                "--out", str(tmp_path / "speed"), "--candidate", "muon=--optimizer muon --max-steps 2",
                "--", *tiny, "--eval-interval", "2"]  # fmt: skip
    printed = subprocess.run(speedrun, cwd=REPO, check=True, capture_output=True, text=True).stdout
    results = json.loads((tmp_path / "speed" / "results.json").read_text())
    assert set(results) == {"baseline", "muon"} and results["muon"][0]["train_s"] > 0
    muon, baseline = results["muon"][0], results["baseline"][0]
    assert "| muon | 0 | 2 |" in printed and "| muon | mean | 2 |" in printed
    assert f"baseline, seed 0: {baseline['bpb']:.4f} bits/byte" in printed
    row = next(line for line in printed.splitlines() if line.startswith("| muon | 0 |")).split(" | ")
    assert float(row[4]) == pytest.approx(muon["bpb"] - baseline["bpb"], abs=1e-4)
    assert float(row[8].rstrip(" |")) == pytest.approx(muon["wall_s"] / baseline["wall_s"], abs=0.01)


def test_demo_step_cost_times_every_variant_against_the_first(capsys):
    """bench/demo_step_cost.py at a tiny size: one row per variant, the first at ratio 1."""
    tiny = "dim:32,n_layers:1,n_heads:2,multiple_of:16,vocab:128,seq:16,batch:2"
    demo_step_cost.main(["--rounds", "1", "--variants", f"a={tiny}", f"b={tiny},dtype:bf16",
                         f"c={tiny},optimizer:muon,tie:1"])  # fmt: skip
    rows = [
        line.split(" | ")
        for line in capsys.readouterr().out.splitlines()
        if line[:4] in ("| a ", "| b ", "| c ")
    ]
    assert [row[0] for row in rows] == ["| a", "| b", "| c"] and rows[0][4] == "1.000 |"
    assert float(rows[1][4].rstrip(" |")) > 0 and float(rows[2][4].rstrip(" |")) > 0
    assert all(float(row[1]) >= 0 for row in rows)  # the first step's seconds
