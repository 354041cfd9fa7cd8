"""GGUF export: every tensor and metadata key read back, clear refusals, and llama.cpp's parity with ours.

Models are tiny, with seeded random weights, saved as checkpoint folders and exported through the
command line (`python -m llama_mini.convert SRC OUT.gguf`). The files are read back with the gguf
package's own reader. Where llama.cpp is installed (pip install llama-cpp-python) it loads the files and
must produce our logits and greedy tokens, which proves the RoPE layout, the tensor names and the
tokenizer; without it those tests skip.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from bench.decode_cpu import portable_llama
from llama_mini import FEED_FORWARDS, Transformer, get_preset
from llama_mini.checkpoint import save_pretrained
from llama_mini.checkpoint.gguf import sentencepiece_vocab, write_gguf
from llama_mini.convert import main
from llama_mini.generation import generate
from llama_mini.model.transformer import precompute_rotations
from llama_mini.tokenizer import train_tokenizer

gguf = pytest.importorskip("gguf")

VOCAB = 96  # more rows than the 64-piece shared tokenizer: the export pads the vocabulary
SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)

# Our parameter names -> llama.cpp's, written out here independently of llama_mini.gguf.
LAYER_NAMES = {
    "attention_norm.weight": "attn_norm.weight",
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
}


def random_model(seed: int = 0, **overrides) -> Transformer:
    """The tiny preset (GQA: 4 query heads, 2 kv heads) with seeded weights of a spread that makes
    logits differ by far more than float rounding: matrices N(0, 1/in_features), embeddings N(0, 1),
    norm weights 1 + N(0, 0.2)."""
    torch.manual_seed(seed)
    model = Transformer(get_preset("tiny", **{"vocab_size": VOCAB, **overrides}))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 1:
                param.copy_(1.0 + 0.2 * noise)
            elif name == "tok_embeddings.weight":
                param.copy_(noise)
            else:
                param.copy_(noise / math.sqrt(param.shape[1]))
    return model.eval()


def export(tmp_path, model: nn.Module, tokenizer, *flags: str, name: str = "model.gguf"):
    """Save `model` with `tokenizer` as a checkpoint folder, convert it through the CLI, read it back."""
    folder = tmp_path / "checkpoint"
    if not folder.exists():
        save_pretrained(model, folder, tokenizer_path=tokenizer)
    assert main([str(folder), str(tmp_path / name), *flags]) == 0
    return gguf.GGUFReader(tmp_path / name)


def fields(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def tensors(reader) -> dict:
    """name -> (storage type name, float32 array in PyTorch's shape), dequantized where stored packed."""
    out = {}
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists the innermost dimension first
        out[tensor.name] = (tensor.tensor_type.name, np.asarray(values, dtype=np.float32).reshape(shape))
    return out


def expected_tensors(model: Transformer) -> dict[str, np.ndarray]:
    """Our parameters under llama.cpp's names, in our (Meta's) RoPE layout; a tied output only once."""
    out = {}
    for name, value in model.state_dict().items():
        if name == "output.weight" and model.args.tie_embeddings:
            continue
        if name.startswith("layers."):
            _, layer, rest = name.split(".", 2)
            gguf_name = f"blk.{layer}.{LAYER_NAMES[rest]}"
        else:
            gguf_name = {
                "tok_embeddings.weight": "token_embd.weight",
                "norm.weight": "output_norm.weight",
            }.get(name, name)
        out[gguf_name] = value.numpy()
    return out


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """Exit code and stderr of the command line, argparse's own exits included."""
    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------------------


def test_f32_export_stores_every_tensor_exactly_in_our_rope_layout(tmp_path, sentencepiece_model):
    model = random_model(tie_embeddings=False)
    stored = tensors(export(tmp_path, model, sentencepiece_model, "--dtype", "f32"))

    expected = expected_tensors(model)
    assert sorted(stored) == sorted(expected)
    for name, value in expected.items():
        kind, array = stored[name]
        assert kind == "F32", name
        np.testing.assert_array_equal(array, value, err_msg=name)


def test_tied_output_is_stored_once_as_token_embd(tmp_path, sentencepiece_model):
    model = random_model(tie_embeddings=True)
    stored = tensors(export(tmp_path, model, sentencepiece_model))

    assert "output.weight" not in stored
    np.testing.assert_array_equal(stored["token_embd.weight"][1], model.output.weight.detach().numpy())


# Rounding to nearest is off by at most half a unit in the last place: a relative 2^-(mantissa bits + 1),
# and for float16's subnormals (below 2^-14) half the smallest step, 2^-25. bfloat16 has float32's range.
@pytest.mark.parametrize(
    "dtype, kind, rtol, atol",
    [("f16", "F16", 2**-11, 2**-25), ("bf16", "BF16", 2**-8, 0.0)],
)
def test_half_precision_exports_round_every_matrix_within_the_format(
    tmp_path, sentencepiece_model, dtype, kind, rtol, atol
):
    model = random_model()
    stored = tensors(export(tmp_path, model, sentencepiece_model, "--dtype", dtype))

    for name, value in expected_tensors(model).items():
        stored_kind, array = stored[name]
        if value.ndim == 1:
            assert stored_kind == "F32", name  # norms stay float32
            np.testing.assert_array_equal(array, value, err_msg=name)
        else:
            assert stored_kind == kind, name
            np.testing.assert_allclose(array, value, rtol=rtol, atol=atol, err_msg=name)
            assert not np.array_equal(array, value), name  # really rounded, not stored as float32


def test_q8_0_export_is_within_half_a_step_of_each_blocks_scale(tmp_path, sentencepiece_model):
    model = random_model()
    stored = tensors(export(tmp_path, model, sentencepiece_model, "--dtype", "q8_0"))

    for name, value in expected_tensors(model).items():
        stored_kind, array = stored[name]
        if value.ndim == 1:
            assert stored_kind == "F32", name
            np.testing.assert_array_equal(array, value, err_msg=name)
            continue
        assert stored_kind == "Q8_0", name
        # Q8_0: blocks of 32 along a row share scale d = max|w| / 127 (stored as float16); each weight is
        # round(w / d) * d, off by at most d / 2, plus d's own float16 rounding times up to 127.
        blocks = value.reshape(-1, 32)
        scale = np.abs(blocks).max(axis=1, keepdims=True) / 127
        error = np.abs(array.reshape(-1, 32) - blocks)
        assert (error <= scale * (0.5 + 127 * 2**-11) + 1e-12).all(), name
        assert error.max() > 0, name


def test_q8_0_keeps_matrices_whose_rows_do_not_split_into_blocks_in_f16(tmp_path, sentencepiece_model):
    model = random_model(hidden_dim=48)  # ffn_down's rows are 48 long: not a multiple of 32
    stored = tensors(export(tmp_path, model, sentencepiece_model, "--dtype", "q8_0"))

    assert stored["blk.0.ffn_down.weight"][0] == "F16"
    assert stored["blk.0.ffn_gate.weight"][0] == "Q8_0"  # rows of dim = 64 weights
    np.testing.assert_allclose(
        stored["blk.0.ffn_down.weight"][1],
        model.layers[0].feed_forward.w2.weight.detach().numpy(),
        rtol=2**-11,
        atol=2**-25,
    )


def test_llama31_rope_scaling_becomes_llama_cpps_rope_freqs_divisors(tmp_path, sentencepiece_model):
    model = random_model(rope_scaling=SCALING)
    stored = tensors(export(tmp_path, model, sentencepiece_model))

    # llama.cpp divides pair i's frequency by rope_freqs[i]: 1 for wavelengths under 32 / 4 positions,
    # the factor 8 over 32 / 1, and 1 / ((1 - s) / 8 + s) between, s = (32 / wavelength - 1) / (4 - 1).
    head_dim = model.args.head_dim
    expected = []
    for i in range(head_dim // 2):
        wavelength = 2 * math.pi * 10000.0 ** (2 * i / head_dim)
        if wavelength < 32 / 4:
            expected.append(1.0)
        elif wavelength > 32 / 1:
            expected.append(8.0)
        else:
            smooth = (32 / wavelength - 1) / (4 - 1)
            expected.append(1 / ((1 - smooth) / 8 + smooth))
    kind, factors = stored["rope_freqs.weight"]
    assert kind == "F32"
    np.testing.assert_allclose(factors, expected, rtol=1e-6)
    # and they reproduce our scaled table: angle = position * plain frequency / factor
    plain = 1.0 / 10000.0 ** (np.arange(0, head_dim, 2) / head_dim)
    ours = precompute_rotations(head_dim, 2, scaling=SCALING)[1, :, :]  # position 1: (cos, sin) of freq
    np.testing.assert_allclose(np.cos(plain / factors), ours[:, 0].numpy(), atol=1e-6)


def test_plain_rope_writes_no_rope_freqs(tmp_path, sentencepiece_model):
    stored = tensors(export(tmp_path, random_model(), sentencepiece_model))
    assert "rope_freqs.weight" not in stored


# ---------------------------------------------------------------------------------------------------------
# Metadata and tokenizer
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, file_type", [("f32", 0), ("f16", 1), ("q8_0", 7), ("bf16", 32)])
def test_metadata_describes_the_model(tmp_path, sentencepiece_model, dtype, file_type):
    model = random_model(norm_eps=1e-6, rope_theta=50000.0)
    values = fields(export(tmp_path, model, sentencepiece_model, "--dtype", dtype))

    model_keys = {
        "general.architecture": "llama",
        "general.name": "checkpoint",
        "general.file_type": file_type,
        "general.quantization_version": 2,
        "llama.vocab_size": VOCAB,
        "llama.context_length": 64,
        "llama.embedding_length": 64,
        "llama.block_count": 2,
        "llama.feed_forward_length": model.layers[0].feed_forward.w1.weight.shape[0],
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.freq_base": 50000.0,
        "llama.rope.dimension_count": 16,
    }
    for key, value in model_keys.items():
        assert values[key] == value, key
    assert values["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6, rel=1e-7)  # a float32
    tokenizer_keys = {key for key in values if key.startswith("tokenizer.")}
    assert set(values) == set(model_keys) | {"llama.attention.layer_norm_rms_epsilon"} | tokenizer_keys


def test_sentencepiece_tokenizer_is_embedded_piece_by_piece(tmp_path, sentencepiece_model):
    import sentencepiece

    values = fields(export(tmp_path, random_model(), sentencepiece_model))

    processor = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_model))
    n = processor.vocab_size()
    assert values["tokenizer.ggml.model"] == "llama"
    assert values["tokenizer.ggml.tokens"][:n] == [processor.id_to_piece(i) for i in range(n)]
    assert values["tokenizer.ggml.tokens"][n:] == [f"[PAD{i}]" for i in range(n, VOCAB)]
    assert values["tokenizer.ggml.scores"][:n] == pytest.approx([processor.get_score(i) for i in range(n)])
    types = values["tokenizer.ggml.token_type"]
    assert types[:3] == [2, 3, 3]  # <unk> unknown, <s> and </s> control
    assert set(types[3:n]) == {1}  # this model has no byte pieces
    assert set(types[n:]) == {5}  # padding: unused
    assert (values["tokenizer.ggml.bos_token_id"], values["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert values["tokenizer.ggml.unknown_token_id"] == 0
    assert (values["tokenizer.ggml.add_bos_token"], values["tokenizer.ggml.add_eos_token"]) == (True, False)
    # sentencepiece's defaults, which the shared fixture keeps: a dummy prefix, runs of spaces collapsed
    assert values["tokenizer.ggml.add_space_prefix"] is True
    assert values["tokenizer.ggml.remove_extra_whitespaces"] is True


@pytest.fixture(scope="module")
def our_tokenizer(tmp_path_factory):
    """A tokenizer made by llama_mini's own trainer: byte fallback, identity normalisation, spaces kept."""
    text = "Once upon a time, a little fox jumped over 12 lazy dogs.\n  Then it slept.\n" * 30
    return train_tokenizer([text], tmp_path_factory.mktemp("ours") / "tokenizer.model", vocab_size=300)


def test_our_tokenizers_byte_pieces_and_kept_spaces_are_declared(tmp_path, our_tokenizer):
    values = fields(export(tmp_path, random_model(vocab_size=320), our_tokenizer.model_path))

    types = values["tokenizer.ggml.token_type"]
    assert types[3:259] == [6] * 256  # <0x00> .. <0xFF>
    assert values["tokenizer.ggml.tokens"][3] == "<0x00>"
    assert values["tokenizer.ggml.remove_extra_whitespaces"] is False


# ---------------------------------------------------------------------------------------------------------
# Refusals: one line on stderr, exit code 2, no file
# ---------------------------------------------------------------------------------------------------------


def assert_refused(code: int, err: str, tmp_path, *needles: str) -> None:
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    leftovers = [path.name for path in tmp_path.iterdir() if path.suffix in (".gguf", ".tmp")]
    assert leftovers == [], leftovers


@pytest.mark.parametrize("ffn", [name for name in FEED_FORWARDS if name != "swiglu"])
def test_feed_forwards_llama_cpp_computes_differently_are_refused(tmp_path, capsys, sentencepiece_model, ffn):
    model = Transformer(get_preset("tiny", vocab_size=VOCAB, ffn=ffn))
    save_pretrained(model, tmp_path / "checkpoint", tokenizer_path=sentencepiece_model)

    code, err = run_cli(capsys, str(tmp_path / "checkpoint"), str(tmp_path / "model.gguf"))
    assert_refused(code, err, tmp_path, f"ffn {ffn!r}", "SwiGLU")


def test_trainable_swish_beta_is_refused(tmp_path, capsys, sentencepiece_model):
    args = dict(vocab_size=VOCAB, ffn="swish", swish_beta_trainable=True)
    save_pretrained(
        Transformer(get_preset("tiny", **args)), tmp_path / "checkpoint", tokenizer_path=sentencepiece_model
    )

    code, err = run_cli(capsys, str(tmp_path / "checkpoint"), str(tmp_path / "model.gguf"))
    assert_refused(code, err, tmp_path, "trainable beta")


def test_unknown_dtype_is_refused(tmp_path, capsys, sentencepiece_model):
    save_pretrained(random_model(), tmp_path / "checkpoint", tokenizer_path=sentencepiece_model)

    code, err = run_cli(capsys, str(tmp_path / "checkpoint"), str(tmp_path / "model.gguf"), "--dtype", "q6_k")
    assert_refused(code, err, tmp_path, "q6_k", "q4_0")


def test_existing_file_is_kept_without_force_and_replaced_with_it(tmp_path, capsys, sentencepiece_model):
    save_pretrained(random_model(), tmp_path / "checkpoint", tokenizer_path=sentencepiece_model)
    target = tmp_path / "model.gguf"
    target.write_bytes(b"precious")

    code, err = run_cli(capsys, str(tmp_path / "checkpoint"), str(target))
    assert code == 2 and "--force" in err and err.count("\n") == 1
    assert target.read_bytes() == b"precious"

    assert main([str(tmp_path / "checkpoint"), str(target), "--force"]) == 0
    assert gguf.GGUFReader(target).fields["general.architecture"].contents() == "llama"


def test_missing_tokenizer_is_refused(tmp_path, capsys):
    save_pretrained(random_model(), tmp_path / "checkpoint")

    code, err = run_cli(capsys, str(tmp_path / "checkpoint"), str(tmp_path / "model.gguf"))
    assert_refused(code, err, tmp_path, "--tokenizer")


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, capsys, sentencepiece_model):
    save_pretrained(random_model(vocab_size=32), tmp_path / "checkpoint", tokenizer_path=sentencepiece_model)

    code, err = run_cli(capsys, str(tmp_path / "checkpoint"), str(tmp_path / "model.gguf"))
    assert_refused(code, err, tmp_path, "64 pieces", "32 rows")


def test_q8_0_is_refused_for_a_folder_destination(tmp_path, capsys, sentencepiece_model):
    save_pretrained(random_model(), tmp_path / "checkpoint", tokenizer_path=sentencepiece_model)

    code, err = run_cli(capsys, str(tmp_path / "checkpoint"), str(tmp_path / "hf"), "--dtype", "q8_0")
    assert code == 2 and ".gguf" in err and err.count("\n") == 1
    assert not (tmp_path / "hf").exists()


def test_folder_destination_accepts_ggufs_spelling_f16(tmp_path, capsys, sentencepiece_model):
    save_pretrained(random_model(), tmp_path / "checkpoint", tokenizer_path=sentencepiece_model)

    assert main([str(tmp_path / "checkpoint"), str(tmp_path / "hf"), "--dtype", "f16"]) == 0
    assert "float16" in capsys.readouterr().out


def test_a_failed_write_leaves_no_partial_file(tmp_path, monkeypatch, sentencepiece_model):
    def fail_midway(writer, *args, **kwargs):
        writer.fout[0].write(b"half a tensor")
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        write_gguf(random_model(), tmp_path / "model.gguf", sentencepiece_vocab(sentencepiece_model))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# llama.cpp itself (pip install llama-cpp-python): the files compute our model
# ---------------------------------------------------------------------------------------------------------

PROMPTS = [[1, 17, 42, 9], [1, 80, 3, 3, 61, 25, 90, 12, 44], [1] + list(range(20, 52))]


def llama_cpp_model(path, **options):
    """llama.cpp on the file, with a float32 KV cache: its default, float16, rounds keys and values
    (logits then differ by ~1e-3), which would hide a small discrepancy of the export. Its AMX weight
    layouts are off (`portable_llama`: they crash llama-cpp-python 0.3.36 on q8_0 files, on CI's CPU too)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    f32 = llama_cpp.GGML_TYPE_F32
    return portable_llama(
        llama_cpp,
        model_path=str(path),
        n_ctx=64,
        n_threads=2,
        type_k=f32,
        type_v=f32,
        verbose=False,
        **options,
    )


def llama_cpp_logits(path, prompt: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of `prompt`, (T, vocab)."""
    model = llama_cpp_model(path, logits_all=True)
    model.eval(prompt)
    return np.array(model.scores[: len(prompt)])


def our_logits(model: Transformer, prompt: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([prompt]))[0].numpy()


@pytest.mark.parametrize(
    "overrides",
    [dict(tie_embeddings=False), dict(tie_embeddings=True), dict(rope_scaling=SCALING)],
    ids=["untied", "tied", "llama3-rope-scaling"],
)
def test_llama_cpp_computes_our_logits_from_the_f32_file(tmp_path, sentencepiece_model, overrides):
    model = random_model(**overrides)
    export(tmp_path, model, sentencepiece_model)

    prompt = PROMPTS[2]
    ours = our_logits(model, prompt)
    np.testing.assert_allclose(llama_cpp_logits(tmp_path / "model.gguf", prompt), ours, atol=1e-4, rtol=0)
    assert ours.std() > 0.5  # logits of a usable spread: a 1e-4 agreement is a real one


def test_llama_cpp_sees_the_rope_scaling(tmp_path, sentencepiece_model):
    # The scaled and the plain model share every weight: only rope_freqs tells llama.cpp to scale.
    scaled, plain = random_model(rope_scaling=SCALING), random_model()
    export(tmp_path, scaled, sentencepiece_model)

    theirs = llama_cpp_logits(tmp_path / "model.gguf", PROMPTS[2])
    assert np.abs(theirs - our_logits(scaled, PROMPTS[2])).max() < 1e-4
    assert np.abs(theirs - our_logits(plain, PROMPTS[2])).max() > 0.1


def test_parity_detects_hugging_faces_rope_layout(tmp_path, sentencepiece_model):
    # Written with Hugging Face's rotate-half row order, the file would be the wrong model for llama.cpp:
    # position 0 (no rotation) still agrees, every later position does not. So the test above proves
    # that llama.cpp expects our (Meta's) adjacent-pair layout.
    from llama_mini.checkpoint import permute_for_hf

    model = random_model()
    permuted = random_model()
    with torch.no_grad():
        for layer in permuted.layers:
            layer.attention.wq.weight.copy_(permute_for_hf(layer.attention.wq.weight, 4))
            layer.attention.wk.weight.copy_(permute_for_hf(layer.attention.wk.weight, 2))
    export(tmp_path, permuted, sentencepiece_model)

    difference = np.abs(llama_cpp_logits(tmp_path / "model.gguf", PROMPTS[2]) - our_logits(model, PROMPTS[2]))
    assert difference[0].max() < 1e-4
    assert difference[1:].max(axis=-1).min() > 1e-2


def test_llama_cpp_greedy_tokens_equal_ours(tmp_path, sentencepiece_model):
    model = random_model()
    export(tmp_path, model, sentencepiece_model)
    llama = llama_cpp_model(tmp_path / "model.gguf", logits_all=True)

    for prompt in PROMPTS:
        ours = generate(model, [prompt], 24, temperature=0)[0]
        llama.reset()
        llama.eval(prompt)
        theirs = []
        for _ in range(24):
            theirs.append(int(np.argmax(llama.scores[llama.n_tokens - 1])))
            llama.eval(theirs[-1:])
        assert theirs == ours, prompt
        assert len(set(ours)) > 3, ours  # a real continuation, not one token repeated


# Measured on this model (logits' std ~1): f16 0.003, bf16 0.02, q8_0 0.09 at most; 3x that is allowed.
@pytest.mark.parametrize("dtype, tolerance", [("f16", 0.01), ("bf16", 0.06), ("q8_0", 0.25)])
def test_llama_cpp_runs_the_rounded_exports_close_to_our_logits(
    tmp_path, sentencepiece_model, dtype, tolerance
):
    model = random_model()
    export(tmp_path, model, sentencepiece_model, "--dtype", dtype)

    prompt = PROMPTS[2]
    theirs, ours = llama_cpp_logits(tmp_path / "model.gguf", prompt), our_logits(model, prompt)
    assert np.abs(theirs - ours).max() < tolerance


@pytest.mark.parametrize(
    "text", ["Once upon a time", "  two  spaces\n\nand newlines\n", "über 🙂 café 1234", " leading", ""]
)
def test_llama_cpp_tokenizes_like_our_sentencepiece_model(tmp_path, our_tokenizer, text):
    export(tmp_path, random_model(vocab_size=320), our_tokenizer.model_path)
    llama = llama_cpp_model(tmp_path / "model.gguf", vocab_only=True)

    assert llama.tokenize(text.encode(), add_bos=True, special=False) == our_tokenizer.encode(text, bos=True)


# ---------------------------------------------------------------------------------------------------------
# Byte-level BPE (tokenizer.json): a Llama-3-style folder, its pre-tokenizer, chat template and end of turn
# ---------------------------------------------------------------------------------------------------------

# Llama 3's split expression, as its tokenizer.json writes it
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
# A chat template in Llama 3's format (bos, a header per message, <|eot_id|> after each turn)
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{% for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
BPE_TRAINING_TEXT = [
    "Once upon a time, a little fox jumped over 12 lazy dogs. It's 2024 and they'll see 365 days.\n",
    "  Indented lines,\ttabs and   runs of spaces\n\n\nand blank lines. Über café naïve 東京 🙂🦙!\n",
    "Numbers 1234567 3.14159 and symbols: #$%&*()[]{}<>=+- \"quotes\" 'single' CAPS lowercase.\n",
] * 20
TEXTS = [
    "Once upon a time",
    " leading space and trailing space ",
    "  two  spaces\n\nnewlines\n\n\n\tand a tab",
    "über 🙂 café 1234567 and 3.14",
    "It's THEY'LL we've I'd",
    "symbols #$%&*() {[<>]} ==>",
    "unseen: Ωmega ℵ 𝔘nicode 🦙🦙🦙",
    "",
]
PRE_TOKENIZERS = {  # name: (pre_tokenizer steps, ignore_merges, llama.cpp's name)
    "llama3": ([("split", LLAMA3_SPLIT), ("byte_level", False)], True, "llama-bpe"),
    "llama3-split-with-merges": ([("split", LLAMA3_SPLIT), ("byte_level", False)], False, "dbrx"),
    "smollm": ([("digits", True), ("byte_level", True)], False, "smollm"),
    "gpt2": ([("byte_level", True)], False, "gpt-2"),
}


def byte_level_bpe_folder(folder, steps, ignore_merges, vocab_size: int = 400):
    """A tokenizer folder as Llama 3's is made: a byte-level BPE trained by the tokenizers library, its
    special tokens added after the vocabulary, bos added by the post-processor, a chat template in
    tokenizer_config.json and both end ids in generation_config.json."""
    import json

    from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
    from tokenizers import Tokenizer as HFTokenizer

    tokenizer = HFTokenizer(models.BPE(ignore_merges=ignore_merges))
    made = []
    for kind, value in steps:
        if kind == "split":
            made.append(pre_tokenizers.Split(Regex(value), behavior="isolated"))
        elif kind == "digits":
            made.append(pre_tokenizers.Digits(individual_digits=value))
        else:
            made.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=value))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(made) if len(made) > 1 else made[0]
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(BPE_TRAINING_TEXT, trainer)
    tokenizer.add_special_tokens(LLAMA3_SPECIALS)
    bos = tokenizer.token_to_id("<|begin_of_text|>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
        "chat_template": LLAMA3_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    end_ids = [tokenizer.token_to_id("<|end_of_text|>"), tokenizer.token_to_id("<|eot_id|>")]
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": end_ids}))
    return folder


@pytest.fixture(scope="module")
def llama3_tokenizer(tmp_path_factory):
    from llama_mini.tokenizer import Tokenizer

    steps, ignore_merges, _ = PRE_TOKENIZERS["llama3"]
    return Tokenizer(byte_level_bpe_folder(tmp_path_factory.mktemp("llama3"), steps, ignore_merges))


@pytest.fixture(scope="module")
def llama3_export(tmp_path_factory, llama3_tokenizer):
    """A Llama-3-style checkpoint (vocabulary rounded up to 416 rows) and its f32 GGUF file, through the CLI."""
    tmp_path = tmp_path_factory.mktemp("llama3_export")
    model = random_model(vocab_size=416)
    reader = export(tmp_path, model, llama3_tokenizer.model_path.parent)
    return model, tmp_path / "model.gguf", reader


def test_byte_level_bpe_is_embedded_with_merges_pre_tokenizer_and_chat_template(
    llama3_export, llama3_tokenizer
):
    import json

    values = fields(llama3_export[2])
    spec = json.loads(llama3_tokenizer.model_path.read_text())
    ours = llama3_tokenizer
    n = ours.vocab_size
    assert values["tokenizer.ggml.model"] == "gpt2"
    assert values["tokenizer.ggml.pre"] == "llama-bpe"
    assert values["tokenizer.ggml.tokens"][:n] == [ours.id_to_piece(i) for i in range(n)]
    assert values["tokenizer.ggml.tokens"][n:] == [f"[PAD{i}]" for i in range(n, 416)]
    types = values["tokenizer.ggml.token_type"]
    assert types[: n - 5] == [1] * (n - 5) and types[n - 5 : n] == [3] * 5 and set(types[n:]) == {5}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    assert values["tokenizer.ggml.merges"] == merges and len(merges) > 100
    ids = {name: ours.special_tokens[name] for name in LLAMA3_SPECIALS}
    assert values["tokenizer.ggml.bos_token_id"] == ids["<|begin_of_text|>"]
    assert values["tokenizer.ggml.eos_token_id"] == ids["<|end_of_text|>"]
    assert values["tokenizer.ggml.eot_token_id"] == ids["<|eot_id|>"]
    assert (values["tokenizer.ggml.add_bos_token"], values["tokenizer.ggml.add_eos_token"]) == (True, False)
    assert values["tokenizer.chat_template"] == LLAMA3_TEMPLATE
    assert "tokenizer.ggml.scores" not in values


def test_sentencepiece_export_carries_the_chat_template_our_chat_renders_with(tmp_path, sentencepiece_model):
    from llama_mini.tokenizer import DEFAULT_CHAT_TEMPLATE

    values = fields(export(tmp_path, random_model(), sentencepiece_model))
    assert values["tokenizer.chat_template"] == DEFAULT_CHAT_TEMPLATE
    assert "tokenizer.ggml.eot_token_id" not in values  # its turns end with eos itself


def test_pre_tokenizer_llama_cpp_does_not_know_is_refused(tmp_path, capsys):
    import json

    folder = byte_level_bpe_folder(tmp_path / "tok", *PRE_TOKENIZERS["gpt2"][:2])
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [{"type": "Punctuation", "behavior": "Isolated"}, spec["pre_tokenizer"]],
    }
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    save_pretrained(random_model(vocab_size=416), tmp_path / "checkpoint", tokenizer_path=folder)

    code, err = run_cli(capsys, str(tmp_path / "checkpoint"), str(tmp_path / "model.gguf"))
    assert_refused(code, err, tmp_path, "pre-tokenizer", "Punctuation", "llama.cpp")


@pytest.mark.parametrize("kind", list(PRE_TOKENIZERS))
def test_llama_cpp_tokenizes_and_detokenizes_like_our_tokenizer_json(tmp_path, kind):
    from llama_mini.checkpoint.gguf import gguf_vocab
    from llama_mini.tokenizer import Tokenizer

    steps, ignore_merges, name = PRE_TOKENIZERS[kind]
    ours = Tokenizer(byte_level_bpe_folder(tmp_path / "tok", steps, ignore_merges))
    vocab = gguf_vocab(ours.model_path.parent)
    assert vocab.settings["pre"] == name
    write_gguf(random_model(vocab_size=416), tmp_path / "model.gguf", vocab)
    llama = llama_cpp_model(tmp_path / "model.gguf", vocab_only=True)

    for text in TEXTS:
        ids = ours.encode(text, bos=True)
        assert llama.tokenize(text.encode(), add_bos=True, special=False) == ids, text
        assert llama.detokenize(ids[1:]).decode() == ours.decode(ids) == text
    # the text of a special token is text unless asked, as in ours
    text = "<|eot_id|>Hi<|end_header_id|>"
    assert llama.tokenize(text.encode(), add_bos=False, special=False) == ours.encode(text)
    assert llama.tokenize(text.encode(), add_bos=False, special=True) == ours.encode(text, parse_special=True)


@pytest.mark.numerics
def test_llama_cpp_greedy_decodes_the_llama3_style_export_as_we_do(llama3_export, llama3_tokenizer):
    model, path, _ = llama3_export
    ours = llama3_tokenizer
    llama = llama_cpp_model(path, logits_all=True)

    for text in ["Once upon a time", "über 🙂 café 1234567\n\n  and"]:
        prompt = ours.encode(text, bos=True)
        assert llama.tokenize(text.encode(), add_bos=True, special=False) == prompt
        expected = generate(model, [prompt], 16, temperature=0)[0]
        llama.reset()
        llama.eval(prompt)
        theirs = []
        for _ in range(16):
            theirs.append(int(np.argmax(llama.scores[llama.n_tokens - 1])))
            llama.eval(theirs[-1:])
        assert theirs == expected, text
        assert len(set(expected)) > 3, expected
        assert llama.detokenize(theirs).decode(errors="replace") == ours.decode(expected)


CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Who wrote Hamlet? 🙂"},
    {"role": "assistant", "content": "Shakespeare."},
    {"role": "user", "content": "When?\n"},
]


def test_llama_cpp_renders_the_embedded_chat_template_as_we_do(llama3_export, llama3_tokenizer):
    import ctypes

    pytest.importorskip("llama_cpp")  # as every llama.cpp test: .ci/run installs it, `make test` may not
    from llama_cpp import llama_chat_format, llama_cpp

    from llama_mini.tokenizer import chat_stop_ids, encode_chat, render_chat

    ours = llama3_tokenizer
    llama = llama_cpp_model(llama3_export[1], vocab_only=True)
    template = llama.metadata["tokenizer.chat_template"]
    # llama-cpp-python's Jinja formatter, given the special tokens' text as Llama() gives it
    text = lambda token_id: llama._model.token_get_text(token_id)  # noqa: E731
    formatter = llama_chat_format.Jinja2ChatFormatter(
        template=template, eos_token=text(llama.token_eos()), bos_token=text(llama.token_bos())
    )
    assert formatter(messages=CHAT).prompt == render_chat(ours, CHAT, add_generation_prompt=True)

    # llama.cpp's own C++ renderer recognises the Llama 3 format; it leaves bos to the tokenizer's add_bos
    messages = (llama_cpp.llama_chat_message * len(CHAT))(
        *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in CHAT]
    )
    buffer = ctypes.create_string_buffer(4096)
    length = llama_cpp.llama_chat_apply_template(template.encode(), messages, len(CHAT), True, buffer, 4096)
    assert 0 < length < 4096
    rendered = buffer.raw[:length]
    ids = llama.tokenize(rendered, add_bos=True, special=True)
    assert ids == encode_chat(ours, CHAT, add_generation_prompt=True).ids

    # and it stops where our chat stops: at <|eot_id|> and at <|end_of_text|>, nowhere else
    vocab = llama._model.vocab
    stops = {i for i in range(ours.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    assert stops == set(chat_stop_ids(ours)) and len(stops) == 2


# ---------------------------------------------------------------------------------------------------------
# 4-bit and 5-bit blocks
# ---------------------------------------------------------------------------------------------------------


def test_q4_0_export_is_ggmls_block_formula(tmp_path, sentencepiece_model):
    model = random_model()
    stored = tensors(export(tmp_path, model, sentencepiece_model, "--dtype", "q4_0"))

    for name, value in expected_tensors(model).items():
        kind, array = stored[name]
        if value.ndim == 1:
            assert kind == "F32", name
            continue
        assert kind == "Q4_0", name
        # ggml's Q4_0 (quantize_row_q4_0_ref): blocks of 32 along a row; m is the block's weight of largest
        # magnitude, sign kept, d = m / -8; q = min(15, int(w * (1 / d) + 8.5)) in 4 bits, and d is stored
        # as float16. Reading back: w' = d (q - 8). So m itself comes back as -8 d = m, up to d's rounding.
        blocks = value.reshape(-1, 32).astype(np.float32)
        m = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None], axis=1)
        d = m / np.float32(-8)
        q = np.minimum(15, np.trunc(blocks * (np.float32(1) / d) + np.float32(8.5)))
        expected = d.astype(np.float16).astype(np.float32) * (q - 8)
        np.testing.assert_array_equal(array.reshape(-1, 32), expected, err_msg=name)
        # the weights are 4-bit: 16 levels per block, the extreme one exactly -8 d
        assert max(len(np.unique(row)) for row in array.reshape(-1, 32)) <= 16
        np.testing.assert_allclose(-8 * d.astype(np.float16).astype(np.float32), m, rtol=2**-11)


def dequantized_model(path, like: Transformer) -> Transformer:
    """A copy of `like` carrying exactly the weights the GGUF file at `path` holds, dequantized."""
    stored = tensors(gguf.GGUFReader(path))
    model = random_model(vocab_size=like.args.vocab_size).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("layers."):
                _, layer, rest = name.split(".", 2)
                gguf_name = f"blk.{layer}.{LAYER_NAMES[rest]}"
            else:
                gguf_name = {
                    "tok_embeddings.weight": "token_embd.weight",
                    "norm.weight": "output_norm.weight",
                }
                gguf_name = gguf_name.get(name, name)
            param.copy_(torch.from_numpy(stored[gguf_name][1].copy()))
    return model


def llama_cpp_greedy(llama, prompt: list[int], steps: int) -> list[int]:
    llama.reset()
    llama.eval(prompt)
    tokens = []
    for _ in range(steps):
        tokens.append(int(np.argmax(llama.scores[llama.n_tokens - 1])))
        llama.eval(tokens[-1:])
    return tokens


# Measured on this model (logits' std ~1): llama.cpp against the weights the file holds 0.06 at most for
# every block type (it rounds the activations to 8 bits for the dot products), 3x that is allowed; against
# the unrounded model q4_0 is off by 0.9, q5_0 by 0.5.
@pytest.mark.slow  # 1-3 s each alone, up to 20 s on a busy 2-core machine
@pytest.mark.numerics
@pytest.mark.parametrize("dtype", ["q5_1", "q5_0", "q4_1", "q4_0"])
def test_llama_cpp_runs_the_block_exports_as_the_weights_they_hold(tmp_path, sentencepiece_model, dtype):
    model = random_model()
    export(tmp_path, model, sentencepiece_model, "--dtype", dtype)
    held = dequantized_model(tmp_path / "model.gguf", model)
    tolerance = 0.2

    prompt = PROMPTS[2]
    theirs = llama_cpp_logits(tmp_path / "model.gguf", prompt)
    assert np.abs(theirs - our_logits(held, prompt)).max() < tolerance
    assert np.abs(theirs - our_logits(model, prompt)).max() > 2 * tolerance  # the rounding is real
    # Greedy decoding: each token llama.cpp picks is, for our model with the file's weights and the same
    # tokens before it, within the tolerance of the best; ties closer than that may go either way.
    llama = llama_cpp_model(tmp_path / "model.gguf", logits_all=True)
    for prompt in PROMPTS[:2]:
        tokens = llama_cpp_greedy(llama, prompt, 16)
        ours = our_logits(held, prompt + tokens)[len(prompt) - 1 : -1]
        chosen = ours[np.arange(len(tokens)), tokens]
        assert (chosen >= ours.max(axis=-1) - tolerance).all(), (tokens, ours.max(axis=-1) - chosen)
        assert len(set(tokens)) > 3, tokens
