"""A SentencePiece tokenizer.model becomes a tokenizer.json that tokenizers and transformers (even without
protobuf) encode and decode exactly as sentencepiece does."""

import io
import json
import os
import subprocess
import sys

import pytest
import sentencepiece as spm
import tokenizers
from test_tokenizer import ROUND_TRIP_TEXTS, VOCAB_SIZE, synthetic_corpus

from llama_mini.errors import DataError
from llama_mini.tokenizer import Tokenizer, train_tokenizer
from llama_mini.tokenizer import sentencepiece_model as conversion
from llama_mini.tokenizer.sentencepiece_model import read_sentencepiece_spec

MIXED_TEXTS = [
    *ROUND_TRIP_TEXTS,
    "a long number 12345678901234567890 and 007",
    "\t\tindented\n\n\n\n    four spaces\n",
    "trailing newlines\n\n",
    "emoji 🦙🙂🦙 and CJK 東京都 漢字 that fall back to bytes",
]

# Llama 2's tokenizer settings (its tokenizer.model's trainer and normalizer spec), on a small vocabulary.
LLAMA2_SETTINGS = dict(
    model_type="bpe",
    vocab_size=400,
    byte_fallback=True,
    split_digits=True,
    add_dummy_prefix=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    character_coverage=0.99995,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
)


def train_sentencepiece(path, sentences, **settings):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, num_threads=1, minloglevel=2, **settings
    )
    path.write_bytes(model.getvalue())
    return path


def corpus_lines() -> list[str]:
    """The synthetic corpus one line per sentence, as LLaMA's tokenizer was trained."""
    return [line for document in synthetic_corpus() for line in document.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    return train_tokenizer(
        synthetic_corpus(), tmp_path_factory.mktemp("ours") / "tokenizer.model", VOCAB_SIZE
    )


@pytest.fixture(scope="module")
def llama2(tmp_path_factory):
    path = train_sentencepiece(
        tmp_path_factory.mktemp("llama2") / "tokenizer.model", corpus_lines(), **LLAMA2_SETTINGS
    )
    return Tokenizer(path)


@pytest.fixture(scope="module")
def sentencepiece_defaults(tmp_path_factory):
    """sentencepiece's default normalizer: NFKC, spaces collapsed and stripped; no byte fallback."""
    path = tmp_path_factory.mktemp("defaults") / "tokenizer.model"
    return Tokenizer(train_sentencepiece(path, corpus_lines(), model_type="bpe", vocab_size=300))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, ours, llama2):
    """Our model and the Llama 2-style one, each saved as a checkpoint folder's tokenizer files."""
    folders = {}
    for name, tokenizer in [("ours", ours), ("llama2", llama2)]:
        folders[name] = tmp_path_factory.mktemp(f"saved_{name}")
        tokenizer.save_pretrained(folders[name], model_max_length=64)
    return folders


def sentencepiece_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    processor = spm.SentencePieceProcessor(model_file=str(tokenizer.model_path))
    return processor.encode(text, add_bos=True)


# ---------------------------------------------------------------------------------------------------------
# Reading the model file without protobuf
# ---------------------------------------------------------------------------------------------------------


def test_spec_of_our_tokenizer_shows_train_tokenizers_settings(ours):
    spec = read_sentencepiece_spec(ours.model_path.read_bytes())
    assert (spec.model_type, spec.normalizer_name, spec.precompiled_charsmap) == ("bpe", "identity", b"")
    assert spec.byte_fallback and spec.split_digits and spec.allow_whitespace_only_pieces
    assert spec.add_dummy_prefix and spec.escape_whitespaces
    assert not spec.remove_extra_whitespaces and not spec.treat_whitespace_as_suffix
    assert [piece.text for piece in spec.pieces[:4]] == ["<unk>", "<s>", "</s>", "<0x00>"]
    assert [piece.kind for piece in spec.pieces[:4]] == [2, 3, 3, 6]  # UNKNOWN, CONTROL, CONTROL, BYTE
    assert len(spec.pieces) == VOCAB_SIZE


def test_spec_read_from_the_wire_equals_protobufs_reading(ours, llama2, sentencepiece_defaults, tmp_path):
    model_pb2 = pytest.importorskip("sentencepiece.sentencepiece_model_pb2", reason="needs protobuf")
    unigram = train_sentencepiece(
        tmp_path / "unigram.model", corpus_lines(), model_type="unigram", vocab_size=80
    )
    for path in [ours.model_path, llama2.model_path, sentencepiece_defaults.model_path, unigram]:
        model_bytes = path.read_bytes()
        proto = model_pb2.ModelProto()
        proto.ParseFromString(model_bytes)
        spec = read_sentencepiece_spec(model_bytes)
        assert [(piece.text, piece.score, piece.kind) for piece in spec.pieces] == [
            (piece.piece, piece.score, piece.type) for piece in proto.pieces
        ]
        trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
        assert spec.model_type == model_pb2.TrainerSpec.ModelType.Name(trainer.model_type).lower()
        assert (spec.byte_fallback, spec.split_digits) == (trainer.byte_fallback, trainer.split_digits)
        assert spec.allow_whitespace_only_pieces == trainer.allow_whitespace_only_pieces
        assert spec.treat_whitespace_as_suffix == trainer.treat_whitespace_as_suffix
        assert (spec.normalizer_name, spec.precompiled_charsmap) == (
            normalizer.name,
            normalizer.precompiled_charsmap,
        )
        assert (spec.add_dummy_prefix, spec.remove_extra_whitespaces, spec.escape_whitespaces) == (
            normalizer.add_dummy_prefix,
            normalizer.remove_extra_whitespaces,
            normalizer.escape_whitespaces,
        )


def test_defaults_model_reads_as_nfkc_with_whitespace_clean_up(sentencepiece_defaults):
    spec = read_sentencepiece_spec(sentencepiece_defaults.model_path.read_bytes())
    assert spec.normalizer_name == "nmt_nfkc" and len(spec.precompiled_charsmap) > 1000
    assert spec.remove_extra_whitespaces and spec.add_dummy_prefix and not spec.byte_fallback


# ---------------------------------------------------------------------------------------------------------
# tokenizer.json: the same ids and text as sentencepiece
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ours", "llama2"])
@pytest.mark.parametrize("text", MIXED_TEXTS)
def test_tokenizers_library_reads_the_saved_json_with_sentencepieces_ids(saved, request, name, text):
    reference = request.getfixturevalue(name)
    loaded = tokenizers.Tokenizer.from_file(str(saved[name] / "tokenizer.json"))
    ids = loaded.encode(text).ids  # with its post-processor, as transformers would: bos first
    assert ids == sentencepiece_ids(reference, text)
    assert loaded.decode(ids) == text


def test_nfkc_model_converts_with_sentencepieces_normalization(sentencepiece_defaults):
    loaded = tokenizers.Tokenizer.from_str(sentencepiece_defaults.tokenizer_json())
    for text in ["  the\tking  and\n\nthe queen  ", "ＦＵＬＬ width ﬁ and ①", "unknown ✈✈ characters", "   "]:
        ids = loaded.encode(text).ids
        assert ids == sentencepiece_ids(sentencepiece_defaults, text)
    # sentencepiece decodes <unk> as " ⁇ ", tokenizers skips it; texts without unknowns decode alike.
    ids = sentencepiece_ids(sentencepiece_defaults, "  the   king ")
    assert loaded.decode(ids) == sentencepiece_defaults.decode(ids) == "the king"


def test_special_tokens_in_text_split_the_text_as_parse_special_does(saved, ours):
    loaded = tokenizers.Tokenizer.from_file(str(saved["ours"] / "tokenizer.json"))
    text = "<s>the king</s> and<s> thou"
    expected = [1, *ours.encode("the king"), 2, *ours.encode(" and"), 1, *ours.encode(" thou")]
    assert ours.encode(text, parse_special=True) == expected
    assert loaded.encode(text, add_special_tokens=False).ids == expected
    assert ours.encode(text) == ours._backend.processor.encode(text)  # by default "<s>" is just text


def test_unigram_model_is_refused_with_the_reason(tmp_path):
    path = train_sentencepiece(
        tmp_path / "tokenizer.model", corpus_lines(), model_type="unigram", vocab_size=80
    )
    with pytest.raises(
        DataError, match=r"cannot be written as a Hugging Face tokenizer.json: it is a unigram model"
    ):
        Tokenizer(path).tokenizer_json()


def test_user_defined_pieces_are_refused_with_the_reason(tmp_path):
    path = train_sentencepiece(
        tmp_path / "tokenizer.model", corpus_lines(), **{**LLAMA2_SETTINGS, "user_defined_symbols": ["<sep>"]}
    )
    with pytest.raises(DataError, match="it has user-defined pieces"):
        Tokenizer(path).tokenizer_json()


def test_a_conversion_that_disagrees_with_sentencepiece_is_refused(ours, monkeypatch):
    """The check is real: without merges, the pipeline still loads but encodes character by character."""
    conversion._convert.cache_clear()
    monkeypatch.setattr(conversion, "_merges", lambda spec: [])
    try:
        with pytest.raises(DataError, match=r"it would encode '.*' as \[.*\] instead of"):
            ours.tokenizer_json()
    finally:
        conversion._convert.cache_clear()


def test_conversion_is_deterministic(ours, llama2):
    assert ours.tokenizer_json() == conversion._convert.__wrapped__(ours._backend.model_bytes, True)
    assert ours.tokenizer_json() != llama2.tokenizer_json()


# ---------------------------------------------------------------------------------------------------------
# The checkpoint folder's files
# ---------------------------------------------------------------------------------------------------------


def test_save_pretrained_writes_both_tokenizer_files_and_transformers_configs(saved, ours):
    folder = saved["ours"]
    assert sorted(path.name for path in folder.iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    assert (folder / "tokenizer.model").read_bytes() == ours.model_path.read_bytes()
    assert (folder / "tokenizer.json").read_text() == ours.tokenizer_json()
    assert json.loads((folder / "tokenizer_config.json").read_text()) == {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 64,
    }
    special = json.loads((folder / "special_tokens_map.json").read_text())
    assert special == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def test_checkpoint_save_pretrained_writes_the_tokenizer_json_beside_the_model(tmp_path, ours):
    from llama_mini import Transformer, get_preset
    from llama_mini.checkpoint import save_pretrained

    save_pretrained(
        Transformer(get_preset("tiny", vocab_size=VOCAB_SIZE)), tmp_path, tokenizer_path=ours.model_path
    )
    assert (tmp_path / "tokenizer.json").read_text() == ours.tokenizer_json()
    assert (
        json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"]
        == "PreTrainedTokenizerFast"
    )


def test_saved_folder_loads_its_tokenizer_model_with_the_same_sha256(saved, ours):
    again = Tokenizer(saved["ours"])
    assert again.model_path == saved["ours"] / "tokenizer.model"
    assert again.sha256 == ours.sha256


def test_the_saved_json_alone_encodes_like_the_model(saved, ours):
    from_json = Tokenizer(saved["ours"] / "tokenizer.json")
    assert (from_json.bos_id, from_json.eos_id, from_json.pad_id, from_json.add_bos) == (1, 2, -1, True)
    assert from_json.eos_ids == (2,) and from_json.vocab_size == ours.vocab_size
    for text in MIXED_TEXTS:
        assert from_json.encode(text, bos=True, eos=True) == ours.encode(text, bos=True, eos=True)
        assert from_json.decode(ours.encode(text)) == text


def test_saving_a_tokenizer_it_cannot_convert_writes_nothing(tmp_path):
    path = train_sentencepiece(
        tmp_path / "unigram.model", corpus_lines(), model_type="unigram", vocab_size=80
    )
    with pytest.raises(DataError, match="unigram"):
        Tokenizer(path).save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


# transformers in a fresh interpreter where `import google.protobuf` fails, as on a machine without protobuf.
TRANSFORMERS_WITHOUT_PROTOBUF = r"""
import json
import sys


class BlockProtobuf:
    def find_spec(self, name, path=None, target=None):
        if name == "google.protobuf" or name.startswith("google.protobuf."):
            raise ImportError(f"No module named {name!r} (blocked by the test)")
        return None


sys.meta_path.insert(0, BlockProtobuf())
try:
    import google.protobuf  # noqa: F401

    blocked = False
except ImportError:
    blocked = True
import transformers

request = json.load(sys.stdin)
results = {"protobuf_blocked": blocked}
for folder in request["folders"]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = [tokenizer(text).input_ids for text in request["texts"]]
    decoded = [tokenizer.decode(row, skip_special_tokens=True) for row in ids]
    results[folder] = {"class": type(tokenizer).__name__, "is_fast": tokenizer.is_fast, "ids": ids, "decoded": decoded}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def transformers_without_protobuf(saved):
    pytest.importorskip("transformers")
    request = {"folders": [str(saved["ours"]), str(saved["llama2"])], "texts": MIXED_TEXTS}
    result = subprocess.run(
        [sys.executable, "-c", TRANSFORMERS_WITHOUT_PROTOBUF],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["ours", "llama2"])
def test_transformers_without_protobuf_gives_sentencepieces_ids_and_text(
    transformers_without_protobuf, saved, request, name
):
    reference = request.getfixturevalue(name)
    assert transformers_without_protobuf["protobuf_blocked"] is True
    result = transformers_without_protobuf[str(saved[name])]
    assert result["is_fast"] is True
    assert result["ids"] == [sentencepiece_ids(reference, text) for text in MIXED_TEXTS]
    assert result["decoded"] == MIXED_TEXTS
