"""generate.py, run in-process on a tiny saved checkpoint: its text equals the library's, and every mistake
is one line on stderr with exit code 2."""

import importlib.util
import io
import random
from pathlib import Path

import pytest
import torch

from llama_mini.checkpoint import load_model, save_pretrained
from llama_mini.generation import command, decode_continuation, generate, row_seed
from llama_mini.model.presets import get_preset
from llama_mini.model.transformer import Transformer
from llama_mini.ops import aot_step
from llama_mini.tokenizer import train_tokenizer

SCRIPT = Path(__file__).resolve().parent.parent / "generate.py"
_spec = importlib.util.spec_from_file_location("generate_cli", SCRIPT)
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

CONTEXT = 64  # the tiny preset's max_seq_len
SEPARATOR = "-" * 40 + "\n"


class Terminal(io.StringIO):
    """A stdin that says it is a terminal (so generate.py does not read a prompt from it)."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random model with a 300-piece tokenizer, saved as a Hugging Face folder."""
    folder = tmp_path_factory.mktemp("cli")
    rng = random.Random(0)
    words = ["the", "king", "queen", "café", "and", "of", "my", "lord", "thee", "once", "upon", "a", "time"]
    lines = [" ".join(rng.choice(words) for _ in range(10)) for _ in range(300)]
    tokenizer = train_tokenizer(["\n".join(lines) + "\n"], folder / "tokenizer.model", 300)
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", vocab_size=tokenizer.vocab_size))
    with torch.no_grad():  # random norm weights too, so the greedy choices are decisive
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
    save_pretrained(model, folder / "model", tokenizer_path=folder / "tokenizer.model")
    return folder / "model"


@pytest.fixture(scope="module")
def library(checkpoint):
    """The saved model and tokenizer, loaded as the library sees them: the reference for the CLI's text."""
    from llama_mini.tokenizer import Tokenizer

    return load_model(checkpoint), Tokenizer(checkpoint / "tokenizer.model")


@pytest.fixture(autouse=True)
def no_stdin(monkeypatch):
    monkeypatch.setattr("sys.stdin", Terminal(""))


@pytest.fixture(autouse=True)
def compile_cache(monkeypatch, tmp_path) -> Path:
    """The command's default compile cache, moved from the user's cache folder into the test's own."""
    folder = tmp_path / "compiled"
    defaults = command.COMMAND_OPTIONS.replace(compile_cache=str(folder))
    monkeypatch.setattr(command, "COMMAND_OPTIONS", defaults)
    return folder


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def expected_text(library, prompt: str, max_new_tokens: int, **options) -> str:
    model, tokenizer = library
    prompt_ids = tokenizer.encode(prompt, bos=True)
    new_ids = generate(model, [prompt_ids], max_new_tokens, eos_id=tokenizer.eos_id, **options)[0]
    return prompt + decode_continuation(tokenizer, prompt_ids, new_ids) + "\n"


def test_greedy_output_is_the_prompt_and_the_librarys_continuation(checkpoint, library, capsys):
    code, out, err = run(
        capsys,
        "--checkpoint",
        checkpoint,
        "--prompt",
        "the king",
        "--temperature",
        "0",
        "--max-new-tokens",
        12,
    )
    assert (code, err) == (0, "")
    assert out == expected_text(library, "the king", 12, temperature=0)
    assert len(out) > len("the king\n")


def test_streaming_and_batched_runs_print_the_same_samples(checkpoint, library, capsys):
    flags = ["--checkpoint", checkpoint, "--prompt", "the queen", "--prompt", "once upon a time"]
    flags += ["--num-samples", 2, "--seed", 11, "--max-new-tokens", 10, "--temperature", 1.0, "--top-k", 40]
    code, streamed, _ = run(capsys, *flags, "--stream")
    assert code == 0
    code, batched, _ = run(capsys, *flags, "--no-stream")
    assert code == 0
    assert streamed == batched
    # Output r (prompt-major: prompt 0 sample 0, prompt 0 sample 1, prompt 1 sample 0, ...) samples with
    # row_seed(11, r), the same as the library given that seed.
    prompts = ["the queen", "the queen", "once upon a time", "once upon a time"]
    outputs = [
        expected_text(library, prompt, 10, temperature=1.0, top_k=40, top_p=0.9, seed=[row_seed(11, r)])
        for r, prompt in enumerate(prompts)
    ]
    assert batched == SEPARATOR.join(outputs)
    assert outputs[0] != outputs[1]  # two samples of one prompt differ


def test_prompt_from_stdin_when_no_prompt_flag(checkpoint, library, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("my lord\n"))  # not a terminal; one trailing newline dropped
    code, out, _ = run(capsys, "--checkpoint", checkpoint, "--temperature", 0, "--max-new-tokens", 6)
    assert code == 0
    assert out == expected_text(library, "my lord", 6, temperature=0)


def test_prompt_file_is_one_prompt_spanning_lines(checkpoint, library, capsys, tmp_path):
    (tmp_path / "prompt.txt").write_text("the king\nand the queen\n", encoding="utf-8")
    code, out, _ = run(
        capsys, "--checkpoint", checkpoint, "--prompt-file", tmp_path / "prompt.txt", "--temperature", 0,
        "--max-new-tokens", 6,
    )  # fmt: skip
    assert code == 0
    assert out == expected_text(library, "the king\nand the queen", 6, temperature=0)


def test_no_prompt_generates_from_bos_alone(checkpoint, library, capsys):
    code, out, _ = run(capsys, "--checkpoint", checkpoint, "--temperature", 0, "--max-new-tokens", 8)
    assert code == 0
    assert out == expected_text(library, "", 8, temperature=0)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stdin", [Terminal, io.StringIO], ids=["terminal", "pipe"])
def test_interactive_answers_each_line(checkpoint, library, capsys, monkeypatch, stdin):
    """At a terminal the typed prompt is on the screen already: only the reply is printed. From a pipe each
    reply follows its prompt, and replies are separated, so the output reads on its own."""
    monkeypatch.setattr("sys.stdin", stdin("the king\nmy lord\n"))
    flags = ("--interactive", "--temperature", 0, "--max-new-tokens", 5, "--stream")
    code, out, err = run(capsys, "--checkpoint", checkpoint, *flags)
    assert code == 0
    prompts = ("the king", "my lord")
    texts = [expected_text(library, prompt, 5, temperature=0) for prompt in prompts]
    if stdin is Terminal:
        assert out == "".join(text[len(prompt) :] for text, prompt in zip(texts, prompts, strict=True))
    else:
        assert out == texts[0] + command.SEPARATOR + "\n" + texts[1]
    assert err.count("> ") == 3  # asked three times; the third read met the end of input


def test_verbose_reports_prefill_and_decode_speed(checkpoint, capsys):
    code, _, err = run(
        capsys, "--checkpoint", checkpoint, "--prompt", "the", "--max-new-tokens", 4, "--verbose", "--seed", 0
    )
    assert code == 0
    lines = err.splitlines()
    assert lines[0].startswith(f"loaded {checkpoint}: ") and "context 64, cpu float32" in lines[0]
    assert lines[1].startswith("prefill: 2 tokens in ") and " tokens/s); decode: " in lines[1]


@pytest.mark.slow
@pytest.mark.skipif(not aot_step.cpp_compiler_available(), reason="--compile on a CPU needs a C++ compiler")
def test_compile_saves_a_step_that_later_runs_load_and_prints_the_same_text(
    checkpoint, library, capsys, compile_cache, monkeypatch
):
    flags = ["--checkpoint", checkpoint, "--prompt", "the king", "--temperature", "0", "--max-new-tokens", 12]
    expected = expected_text(library, "the king", 12, temperature=0)
    code, out, err = run(capsys, *flags, "--compile")
    assert (code, out) == (0, expected)
    assert len(list(compile_cache.glob("*.pt2"))) == 1  # built once, into the default compile cache
    built = next(compile_cache.glob("*.pt2"))
    assert (
        err
        == f"compiling the decode step for this model shape ahead of time, once: saved as {built}; later runs load it\n"
    )
    monkeypatch.setattr(aot_step, "_LOADED", {})  # as in a new process: the step is on disk only
    monkeypatch.setattr(aot_step, "_build", lambda *args: pytest.fail("rebuilt a saved step"))
    runs = []
    real_bound_to = aot_step.CompiledStep.bound_to
    monkeypatch.setattr(
        aot_step.CompiledStep, "bound_to", lambda self, model: runs.append(1) or real_bound_to(self, model)
    )
    assert run(capsys, *flags, "--compile") == (0, expected, "")  # loads the saved step
    assert run(capsys, *flags) == (0, expected, "")  # no flag: runs the saved step too
    assert run(capsys, *flags, "--no-compile") == (0, expected, "")  # eager
    assert len(runs) == 2


def test_max_new_tokens_beyond_the_context_is_capped_with_a_warning(checkpoint, library, capsys):
    code, out, err = run(
        capsys,
        "--checkpoint",
        checkpoint,
        "--prompt",
        "the king",
        "--max-new-tokens",
        500,
        "--temperature",
        0,
    )
    assert code == 0
    prompt_length = len(library[1].encode("the king", bos=True))
    room = CONTEXT - prompt_length
    assert err == (
        f"warning: --max-new-tokens 500 does not fit the model's context of 64 after a prompt of {prompt_length} "
        f"tokens: capped to {room}\n"
    )
    assert out == expected_text(library, "the king", room, temperature=0)


def test_truncate_keeps_the_last_tokens_with_a_warning(checkpoint, library, capsys):
    long_prompt = " ".join(["the king and the queen"] * 40)
    code, out, err = run(
        capsys, "--checkpoint", checkpoint, "--prompt", long_prompt, "--truncate", "--max-new-tokens", 10,
        "--temperature", 0,
    )  # fmt: skip
    assert code == 0
    model, tokenizer = library
    ids = tokenizer.encode(long_prompt, bos=True)
    assert err.strip() == (
        f"warning: prompt 1 has {len(ids)} tokens: kept its last 53 after BOS to leave room for 10 new tokens "
        f"in the context of 64"
    )
    kept = [tokenizer.bos_id] + ids[-53:]
    new_ids = generate(model, [kept], 10, temperature=0, eos_id=tokenizer.eos_id)[0]
    assert out == long_prompt + decode_continuation(tokenizer, kept, new_ids) + "\n"


def one_line_error(code: int, out: str, err: str) -> str:
    assert code == 2
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err  # one line, so no traceback
    assert err.startswith("error: ")
    return err


def test_a_training_run_folder_is_read_through_its_best_checkpoint(checkpoint, library, tmp_path, capsys):
    """`--checkpoint RUN` (the --out folder train.py printed) uses RUN/best and says so on stderr."""
    import shutil

    run_folder = tmp_path / "run"
    shutil.copytree(checkpoint, run_folder / "best")
    shutil.copytree(checkpoint, run_folder / "step-0000004")
    code, out, err = run(
        capsys, "--checkpoint", run_folder, "--prompt", "the king", "--temperature", 0, "--max-new-tokens", 8
    )
    assert code == 0, err
    assert out == expected_text(library, "the king", 8, temperature=0)
    assert err == f"loading {run_folder / 'best'} (the checkpoint of run folder {run_folder})\n"


def test_a_run_folder_without_best_uses_its_latest_step_checkpoint(checkpoint, tmp_path):
    import shutil

    from llama_mini.checkpoint import resolve_checkpoint

    run_folder = tmp_path / "run"
    for step in ("step-0000002", "step-0000010"):
        shutil.copytree(checkpoint, run_folder / step)
    (run_folder / "step-0000020").mkdir()  # not a checkpoint (no config.json): ignored
    assert resolve_checkpoint(run_folder) == run_folder / "step-0000010"
    assert resolve_checkpoint(run_folder / "step-0000002") == run_folder / "step-0000002"


def test_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    err = one_line_error(*run(capsys, "--checkpoint", tmp_path / "nowhere", "--prompt", "x"))
    assert f"checkpoint {tmp_path / 'nowhere'} does not exist" in err


def test_a_file_as_checkpoint_says_so_first(tmp_path, sentencepiece_model, capsys):
    """Not "pass --tokenizer", whose advice would only lead to "my.txt is a file" next."""
    (tmp_path / "my.txt").write_text("not a model")
    for extra in ((), ("--tokenizer", sentencepiece_model)):
        err = one_line_error(*run(capsys, "--checkpoint", tmp_path / "my.txt", *extra))
        assert f"checkpoint {tmp_path / 'my.txt'} is a file, not a checkpoint" in err


def test_checkpoint_without_tokenizer_is_a_one_line_error(tmp_path, capsys):
    save_pretrained(Transformer(get_preset("tiny")), tmp_path / "bare")
    err = one_line_error(*run(capsys, "--checkpoint", tmp_path / "bare"))
    assert f"checkpoint {tmp_path / 'bare'} has no tokenizer.model: pass --tokenizer" in err


def test_a_missing_tokenizer_file_is_a_one_line_error(checkpoint, tmp_path, capsys):
    err = one_line_error(*run(capsys, "--checkpoint", checkpoint, "--tokenizer", tmp_path / "no.model"))
    assert err.startswith(f"error: --tokenizer {tmp_path / 'no.model'} does not exist: pass the tokenizer")


def test_prompt_longer_than_the_context_is_a_one_line_error(checkpoint, capsys):
    long_prompt = " ".join(["the king and the queen"] * 40)
    err = one_line_error(*run(capsys, "--checkpoint", checkpoint, "--prompt", long_prompt))
    assert "prompt 1 has" in err and "context is 64 positions" in err and "pass --truncate" in err


# ------------------------------------------------------------------ damaged and hostile checkpoints


class RunsCodeWhenUnpickled:
    """A pickled object that would create a file if it were ever unpickled: Meta's .pth files are pickles,
    and loading must refuse anything but tensors (torch.load(weights_only=True))."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def damage(checkpoint: Path, folder: Path, how: str) -> str:
    """A damaged copy of `checkpoint` in `folder`; returns what the one-line error must say."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(checkpoint, folder)
    config_path, weights = folder / "config.json", folder / "model.safetensors"
    config = json.loads(config_path.read_text())
    if how == "nan weights":
        tensors = load_file(weights)
        tensors["model.layers.1.mlp.down_proj.weight"] = torch.full_like(
            tensors["model.layers.1.mlp.down_proj.weight"], float("nan")
        )
        save_file(tensors, str(weights))
        return f"{weights}: tensor 'model.layers.1.mlp.down_proj.weight' holds non-finite values (NaN or inf)"
    if how == "huge vocabulary":  # built on the meta device, so refused by shape, never allocated
        config["llama_mini"]["model_args"]["vocab_size"] = 10**11
        config_path.write_text(json.dumps(config))
        return "has shape [300, 64] but the config needs [100000000000, 64]"
    if how == "negative layers":
        config["llama_mini"]["model_args"]["n_layers"] = -2
        config_path.write_text(json.dumps(config))
        return "n_layers must be a positive integer, got -2"
    if how == "invalid json":
        config_path.write_text("{ not json")
        return f"{config_path}: not valid JSON"
    if how == "garbage tokenizer":
        (folder / "tokenizer.model").write_bytes(bytes(range(256)) * 4)
        return "is not a valid sentencepiece model"
    if how == "huge safetensors header":
        data = weights.read_bytes()
        weights.write_bytes((2**63).to_bytes(8, "little") + data[8:])
        return f"{weights}: is truncated or corrupted"
    if how == "pickled code":
        for name in ("config.json", "model.safetensors", "generation_config.json"):
            (folder / name).unlink()
        (folder / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4}))
        torch.save({"tok_embeddings.weight": torch.zeros(3, 64), "x": RunsCodeWhenUnpickled(folder / "ran")},
                   folder / "consolidated.00.pth")  # fmt: skip
        return (
            f"{folder / 'consolidated.00.pth'}: holds Python objects other than tensors, which are not loaded"
        )
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    ["nan weights", "huge vocabulary", "negative layers", "invalid json", "garbage tokenizer",
     "huge safetensors header", "pickled code"],
)  # fmt: skip
def test_a_damaged_or_hostile_checkpoint_is_one_line_and_exit_2(checkpoint, tmp_path, capsys, how):
    folder = tmp_path / "damaged"
    expected = damage(checkpoint, folder, how)
    err = one_line_error(*run(capsys, "--checkpoint", folder, "--prompt", "the king", "--max-new-tokens", 4))
    assert expected in err, err
    assert not (folder / "ran").exists()  # nothing in a checkpoint runs code


def test_generation_refuses_non_finite_logits_in_one_line(library):
    from llama_mini.generation import GenerationError

    model, tokenizer = library
    broken = Transformer(model.args)
    broken.load_state_dict(model.state_dict())
    with torch.no_grad():
        broken.layers[0].feed_forward.w2.weight.fill_(float("inf"))
    with pytest.raises(GenerationError, match="logits at position 3 are not finite"):
        generate(broken, [tokenizer.encode("the king", bos=True)[:3]], 4, temperature=0.8, top_p=0.9)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--top-p", "1.5"], "error: top_p must be in (0, 1], or None to turn it off; got 1.5"),
        (["--top-k", "0"], "error: top_k must be an integer >= 1, or None to turn it off; got 0"),
        (["--temperature", "-1"], "error: temperature must be >= 0 (0 = greedy), got -1.0"),
        (["--temperature", "hot"], "error: argument --temperature: invalid float value: 'hot' (see --help)"),
        (["--dtype", "fp8"], "error: argument --dtype: invalid choice: 'fp8'"),
        (["--device", "tpu"], "error: unknown --device 'tpu': use auto, cpu, cuda, cuda:N or mps"),
    ],
)
def test_bad_flag_values_are_one_line_errors(checkpoint, capsys, flags, message):
    err = one_line_error(*run(capsys, "--checkpoint", checkpoint, *flags))
    assert err.startswith(message)


def test_a_prefix_of_a_flag_is_refused(checkpoint, capsys):
    err = one_line_error(*run(capsys, "--checkpoint", checkpoint, "--temp", "0.5"))
    assert err == "error: unrecognized arguments: --temp 0.5 (see --help)\n"


def test_the_sampling_flags_defaults_are_sampling_configs(tmp_path):
    """One home for the sampling defaults: the command's flags take them from SamplingConfig."""
    from llama_mini.generation import SamplingConfig

    args = command.build_parser().parse_args(["--checkpoint", str(tmp_path)])
    assert command.sampling_config(args) == SamplingConfig()
    assert command.sampling_config(command.build_parser().parse_args(
        ["--checkpoint", str(tmp_path), "--temperature", "0", "--top-k", "5"]
    )) == SamplingConfig(temperature=0, top_k=5)  # fmt: skip
    help_text = command.build_parser().format_help()
    assert f"(default: {SamplingConfig().temperature})" in help_text


def test_a_compile_cache_that_is_a_file_is_a_one_line_error(checkpoint, capsys, tmp_path):
    (tmp_path / "cache").write_text("")
    err = one_line_error(*run(capsys, "--checkpoint", checkpoint, "--compile-cache", tmp_path / "cache"))
    assert err.startswith(f"error: --compile-cache {tmp_path / 'cache'} is a file: pass a folder, or none")


def test_a_folder_saved_by_transformers_samples_through_generate_py(checkpoint, library, capsys, tmp_path):
    # A Hugging Face Llama folder written by transformers itself (not by llama_mini), with a tokenizer.model
    # beside it, is a valid --checkpoint, and generate.py's greedy text is transformers' greedy text.
    from transformers import LlamaForCausalLM

    hf_model = LlamaForCausalLM.from_pretrained(checkpoint)
    folder = tmp_path / "hf"
    hf_model.save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes((checkpoint / "tokenizer.model").read_bytes())
    _, tokenizer = library
    prompt = "the king and"
    code = cli.main(
        [
            "--checkpoint",
            str(folder),
            "--prompt",
            prompt,
            "--max-new-tokens",
            "12",
            "--temperature",
            "0",
            "--no-stream",
            "--device",
            "cpu",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    prompt_ids = tokenizer.encode(prompt, bos=True)
    with torch.no_grad():
        expected = hf_model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=12,
            eos_token_id=tokenizer.eos_id,
            pad_token_id=0,
        )[0, len(prompt_ids) :].tolist()
    if tokenizer.eos_id in expected:  # both stop at eos, which is not printed
        expected = expected[: expected.index(tokenizer.eos_id)]
    continuation = decode_continuation(tokenizer, prompt_ids, expected)
    assert continuation.strip()  # a real continuation, not an immediate eos
    assert out.startswith(prompt + continuation)
