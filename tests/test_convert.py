"""`python -m llama_mini.convert`: every accepted format in, a Hugging Face Llama folder out, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from llama_mini.checkpoint import load_model, save_pretrained
from llama_mini.convert import main
from llama_mini.model.presets import get_preset
from llama_mini.model.transformer import Transformer

transformers = pytest.importorskip("transformers")
VOCAB = 96


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    """The tiny preset with seeded noise on every parameter (norm weights around 1, not all ones)."""
    torch.manual_seed(seed)
    model = Transformer(get_preset("tiny", **{"vocab_size": VOCAB, **overrides}))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.2 * noise) if param.ndim == 1 else param.add_(0.05 * noise)
    return model.eval()


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))


def write_meta(folder: Path, model: Transformer) -> None:
    folder.mkdir(parents=True)
    args = model.args
    params = dict(
        dim=args.dim,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        n_kv_heads=args.n_kv_heads,
        vocab_size=-1,
        multiple_of=args.multiple_of,
        norm_eps=args.norm_eps,
    )
    (folder / "params.json").write_text(json.dumps(params))
    torch.save(model.state_dict(), folder / "consolidated.00.pth")


def test_meta_checkpoint_converts_to_a_folder_transformers_loads(tmp_path, capsys):
    model = tiny_model()
    write_meta(tmp_path / "meta", model)

    assert main([str(tmp_path / "meta"), str(tmp_path / "hf")]) == 0
    summary = capsys.readouterr().out.strip()
    assert summary.startswith(f"converted {tmp_path / 'meta'} (meta) -> {tmp_path / 'hf'}:")
    assert "float32" in summary
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    batch = tokens()
    with torch.no_grad():
        torch.testing.assert_close(reference.eval()(batch).logits, model(batch), rtol=0, atol=1e-5)


def test_dtype_bf16_casts_every_stored_tensor(tmp_path, capsys):
    model = tiny_model(seed=1)
    save_pretrained(model, tmp_path / "src")

    assert main([str(tmp_path / "src"), str(tmp_path / "dst"), "--dtype", "bf16"]) == 0
    assert "bfloat16" in capsys.readouterr().out
    with safe_open(str(tmp_path / "dst" / "model.safetensors"), framework="pt") as handle:
        assert {handle.get_tensor(name).dtype for name in handle.keys()} == {torch.bfloat16}
    converted = load_model(tmp_path / "dst")
    for name, tensor in model.state_dict().items():
        assert torch.equal(converted.state_dict()[name], tensor.bfloat16()), name


def test_transformers_checkpoint_converts_with_its_tokenizer(tmp_path, sentencepiece_model, capsys):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=100,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        rope_theta=50000.0,
    )
    reference = transformers.LlamaForCausalLM(config).eval()
    reference.save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "tokenizer.model").write_bytes(sentencepiece_model.read_bytes())

    assert main([str(tmp_path / "src"), str(tmp_path / "dst")]) == 0
    assert capsys.readouterr().out.strip().endswith("float32, with tokenizer")
    assert (tmp_path / "dst" / "tokenizer.model").read_bytes() == sentencepiece_model.read_bytes()
    assert json.loads((tmp_path / "dst" / "tokenizer_config.json").read_text())["bos_token"] == "<s>"
    batch = tokens(seed=2)
    with torch.no_grad():
        converted = load_model(tmp_path / "dst")
        torch.testing.assert_close(converted(batch), reference(batch).logits, rtol=0, atol=1e-5)


def test_tokenizer_option_adds_a_tokenizer(tmp_path, sentencepiece_model):
    save_pretrained(tiny_model(), tmp_path / "src")
    assert main([str(tmp_path / "src"), str(tmp_path / "dst"), "--tokenizer", str(sentencepiece_model)]) == 0
    assert (tmp_path / "dst" / "tokenizer.model").read_bytes() == sentencepiece_model.read_bytes()


def test_non_gated_model_is_refused_with_one_line_and_exit_2(tmp_path, capsys):
    save_pretrained(tiny_model(ffn="relu"), tmp_path / "src")

    assert main([str(tmp_path / "src"), str(tmp_path / "dst")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ffn 'relu' has no Hugging Face Llama equivalent")
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert not (tmp_path / "dst").exists()


def test_non_empty_destination_needs_force(tmp_path, capsys):
    save_pretrained(tiny_model(), tmp_path / "src")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "notes.txt").write_text("keep me")

    assert main([str(tmp_path / "src"), str(tmp_path / "dst")]) == 2
    assert (
        capsys.readouterr().err
        == f"error: {tmp_path / 'dst'} is not empty; choose an empty or new folder, or pass --force\n"
    )
    assert main([str(tmp_path / "src"), str(tmp_path / "dst"), "--force"]) == 0
    assert (tmp_path / "dst" / "notes.txt").read_text() == "keep me"
    assert (tmp_path / "dst" / "model.safetensors").is_file()


def test_a_run_folder_converts_its_best_checkpoint_and_says_so(tmp_path, capsys):
    model = tiny_model()
    save_pretrained(model, tmp_path / "run" / "best")
    assert main([str(tmp_path / "run"), str(tmp_path / "dst")]) == 0
    err = capsys.readouterr().err
    assert err == f"loading {tmp_path / 'run' / 'best'} (the checkpoint of run folder {tmp_path / 'run'})\n"
    converted = load_model(tmp_path / "dst")
    for name, tensor in model.state_dict().items():
        assert torch.equal(converted.state_dict()[name], tensor), name


@pytest.mark.parametrize("problem", ["missing", "truncated", "gpt2"])
def test_bad_source_exits_2_with_one_line_naming_the_file(problem, tmp_path, capsys):
    src = tmp_path / "src"
    if problem == "missing":
        expected = f"error: checkpoint folder {src} does not exist"
    elif problem == "truncated":
        save_pretrained(tiny_model(), src)
        weights = src / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:5000])
        expected = f"error: {weights}: is truncated or corrupted"
    else:
        src.mkdir()
        (src / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
        expected = f"error: {src / 'config.json'}: model_type 'gpt2' is not supported"

    assert main([str(src), str(tmp_path / "dst")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1, err


def test_command_line_entry_point_exits_2_on_errors(tmp_path):
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "llama_mini.convert", str(tmp_path / "nowhere"), str(tmp_path / "dst")],
        capture_output=True,
        text=True,
        env=environment,
        cwd=Path(__file__).parent.parent,
    )
    assert result.returncode == 2
    assert (
        result.stderr == f"error: checkpoint folder {tmp_path / 'nowhere'} does not exist; check the path\n"
    )


def test_source_tokenizer_that_is_not_sentencepiece_is_left_out_with_a_note(tmp_path, capsys):
    save_pretrained(tiny_model(), tmp_path / "src")
    (tmp_path / "src" / "tokenizer.model").write_text("IQ== 0\n")  # tiktoken, as in Llama 3's folders

    assert main([str(tmp_path / "src"), str(tmp_path / "dst")]) == 0
    assert (
        capsys.readouterr().err
        == f"note: {tmp_path / 'src' / 'tokenizer.model'} is not a SentencePiece model; not copied\n"
    )
    assert not (tmp_path / "dst" / "tokenizer.model").exists()
