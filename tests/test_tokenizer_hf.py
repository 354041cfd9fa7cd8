"""A Hugging Face tokenizer.json (byte-level BPE, as Llama 3's and SmolLM's) behind the same Tokenizer
interface: transformers' ids, the special tokens of its config files, streaming, saving and loading."""

import json
import random

import pytest
from test_tokenizer import synthetic_corpus
from test_tokenizer_json import MIXED_TEXTS
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from llama_mini.errors import DataError
from llama_mini.tokenizer import Tokenizer, find_tokenizer_file, train_tokenizer

# Llama 3's pre-tokenizer split: contractions, words with one leading non-letter, numbers of up to three
# digits, punctuation runs, newlines, spaces.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
]
CHATML_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BPE_VOCAB_SIZE = 300  # the 256 bytes and 44 merges (the synthetic corpus supports about 390)


def train_byte_level_bpe(
    special_tokens_first: list[str] = (), vocab_size: int = BPE_VOCAB_SIZE
) -> HFTokenizer:
    """A byte-level BPE like Llama 3's and SmolLM's: text split by Llama 3's pattern, each piece's bytes
    written as printable characters (space = 'Ġ'), merges learned on the synthetic corpus."""
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens_first),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(synthetic_corpus(), trainer)
    return tokenizer


def write_json(path, value):
    path.write_text(json.dumps(value, indent=2))


@pytest.fixture(scope="module")
def llama3_folder(tmp_path_factory):
    """Llama 3-style: special tokens after the learned vocabulary, bos added by the post-processor, eos
    <|eot_id|> in tokenizer_config.json and three end ids in generation_config.json."""
    folder = tmp_path_factory.mktemp("llama3")
    tokenizer = train_byte_level_bpe()
    tokenizer.add_special_tokens(LLAMA3_SPECIAL_TOKENS)
    bos_id = tokenizer.token_to_id("<|begin_of_text|>")
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                special_tokens=[("<|begin_of_text|>", bos_id)],
            ),
        ]
    )
    tokenizer.save(str(folder / "tokenizer.json"))
    write_json(
        folder / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "clean_up_tokenization_spaces": True,
            "model_max_length": 131072,
        },
    )
    end_ids = [tokenizer.token_to_id(token) for token in ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]]
    write_json(folder / "generation_config.json", {"bos_token_id": bos_id, "eos_token_id": end_ids})
    return folder


@pytest.fixture(scope="module")
def llama3(llama3_folder):
    return Tokenizer(llama3_folder)


@pytest.fixture(scope="module")
def chatml_folder(tmp_path_factory):
    """SmolLM-style: special tokens first (ids 0, 1, 2), no bos added, ChatML's <|im_end|> as eos."""
    folder = tmp_path_factory.mktemp("chatml")
    tokenizer = train_byte_level_bpe(CHATML_SPECIAL_TOKENS)
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.save(str(folder / "tokenizer.json"))
    write_json(
        folder / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>",
            "pad_token": "<|im_end|>",
            "unk_token": "<|endoftext|>",
            "clean_up_tokenization_spaces": False,
        },
    )
    return folder


@pytest.fixture(scope="module")
def transformers_llama3(llama3_folder):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(llama3_folder)


# ---------------------------------------------------------------------------------------------------------
# Ids, text and special tokens
# ---------------------------------------------------------------------------------------------------------


def test_a_folder_with_only_a_tokenizer_json_loads_it(llama3, llama3_folder):
    assert llama3.model_path == llama3_folder / "tokenizer.json"
    assert llama3.vocab_size == BPE_VOCAB_SIZE + len(LLAMA3_SPECIAL_TOKENS)


@pytest.mark.parametrize("text", MIXED_TEXTS)
def test_ids_with_bos_equal_transformers_ids(llama3, transformers_llama3, text):
    assert llama3.encode(text, bos=True) == transformers_llama3(text).input_ids


@pytest.mark.parametrize("text", MIXED_TEXTS)
def test_decode_of_encode_is_the_text_exactly(llama3, text):
    assert llama3.decode(llama3.encode(text, bos=True, eos=True)) == text


def test_encode_batch_equals_encode_one_by_one(llama3):
    assert llama3.encode_batch(MIXED_TEXTS, bos=True) == [
        llama3.encode(text, bos=True) for text in MIXED_TEXTS
    ]


def test_bos_eos_and_the_end_ids_come_from_the_config_files(llama3):
    ids = {token: BPE_VOCAB_SIZE + index for index, token in enumerate(LLAMA3_SPECIAL_TOKENS)}
    assert (llama3.bos_id, llama3.eos_id, llama3.pad_id) == (ids["<|begin_of_text|>"], ids["<|eot_id|>"], -1)
    # eos_id first, then generation_config.json's list without repeats.
    assert llama3.eos_ids == (ids["<|eot_id|>"], ids["<|end_of_text|>"], ids["<|eom_id|>"])
    assert (llama3.bos_token, llama3.eos_token) == ("<|begin_of_text|>", "<|eot_id|>")
    assert llama3.special_tokens == ids
    assert llama3.add_bos is True  # from the post-processor: the config says nothing


def test_chatml_tokenizer_reads_its_special_tokens_and_adds_no_bos(chatml_folder):
    chatml = Tokenizer(chatml_folder)
    assert (chatml.bos_id, chatml.eos_id, chatml.pad_id, chatml.eos_ids) == (1, 2, 2, (2,))
    assert chatml.add_bos is False
    assert chatml.special_token_names == {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
    }


def test_special_token_text_is_text_unless_parse_special(llama3):
    text = "hi<|eot_id|>"
    eot = llama3.special_tokens["<|eot_id|>"]
    assert llama3.encode(text, parse_special=True) == [*llama3.encode("hi"), eot]
    plain = llama3.encode(text)
    assert eot not in plain and llama3.decode(plain) == text


def test_parse_special_equals_transformers_default_encoding(llama3, transformers_llama3):
    text = "<|start_header_id|>user<|end_header_id|>\n\nthe king 🦙<|eot_id|>"
    expected = transformers_llama3(text, add_special_tokens=False).input_ids
    assert llama3.encode(text, parse_special=True) == expected


def test_config_naming_a_token_outside_the_vocabulary_is_a_clear_error(tmp_path, llama3_folder):
    (tmp_path / "tokenizer.json").write_text((llama3_folder / "tokenizer.json").read_text())
    write_json(tmp_path / "tokenizer_config.json", {"eos_token": "<|not_there|>"})
    with pytest.raises(DataError, match=r"eos_token '<\|not_there\|>' is not in the vocabulary"):
        Tokenizer(tmp_path)


def test_a_malformed_tokenizer_json_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "nothing"}}')
    with pytest.raises(DataError, match="is not a Hugging Face tokenizer.json"):
        Tokenizer(tmp_path / "tokenizer.json")


# ---------------------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------------------


def stream(tokenizer, ids):
    decoder = tokenizer.stream_decoder()
    return [decoder.push(token_id) for token_id in ids] + [decoder.flush()]


@pytest.mark.parametrize("text", MIXED_TEXTS)
def test_streamed_pieces_concatenate_to_the_full_decode(llama3, text):
    ids = llama3.encode(text, bos=True)
    assert "".join(stream(llama3, ids)) == llama3.decode(ids) == text


def test_stream_holds_back_a_character_split_across_byte_tokens(llama3):
    ids = llama3.encode("king 🦙")
    pieces = stream(llama3, ids)
    assert len(ids) > 3 and "🦙" in pieces  # one emission holds the whole character
    assert "".join(pieces) == "king 🦙" and not any("\ufffd" in piece for piece in pieces)


def test_stream_matches_decode_on_random_ids(llama3):
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(llama3.vocab_size) for _ in range(rng.randint(1, 30))]
        assert "".join(stream(llama3, ids)) == llama3.decode(ids), ids


# ---------------------------------------------------------------------------------------------------------
# Identity, loading and saving
# ---------------------------------------------------------------------------------------------------------


def test_sha256_ignores_formatting_but_not_the_special_ids(tmp_path, llama3, llama3_folder):
    copy = tmp_path / "copy"
    copy.mkdir()
    compact = json.dumps(json.loads((llama3_folder / "tokenizer.json").read_text()))
    (copy / "tokenizer.json").write_text(compact)
    for name in ["tokenizer_config.json", "generation_config.json"]:
        (copy / name).write_text((llama3_folder / name).read_text())
    assert Tokenizer(copy).sha256 == llama3.sha256
    config = json.loads((copy / "tokenizer_config.json").read_text())
    write_json(copy / "tokenizer_config.json", {**config, "eos_token": "<|end_of_text|>"})
    assert Tokenizer(copy).sha256 != llama3.sha256


def test_a_tokenizer_model_beside_the_json_wins_unless_it_is_tiktoken(tmp_path, llama3_folder):
    (tmp_path / "tokenizer.json").write_text((llama3_folder / "tokenizer.json").read_text())
    (tmp_path / "tokenizer.model").write_text("IQ== 0\nIg== 1\n")  # a tiktoken file, as in Meta's Llama 3
    assert find_tokenizer_file(tmp_path) == tmp_path / "tokenizer.json"
    (tmp_path / "tokenizer.model").write_bytes(bytes(range(256)))  # damaged: reported, not replaced
    assert find_tokenizer_file(tmp_path) == tmp_path / "tokenizer.model"
    with pytest.raises(DataError, match="is not a valid sentencepiece model"):
        Tokenizer(tmp_path)
    train_tokenizer(synthetic_corpus(), tmp_path / "tokenizer.model", 360)
    assert find_tokenizer_file(tmp_path) == tmp_path / "tokenizer.model"
    assert find_tokenizer_file(tmp_path / "tokenizer.json") == tmp_path / "tokenizer.json"
    assert find_tokenizer_file(tmp_path / "nothing") is None


def test_save_pretrained_copies_the_json_with_its_config(tmp_path, llama3, llama3_folder):
    target = tmp_path / "checkpoint"
    target.mkdir()
    train_tokenizer(synthetic_corpus(), target / "tokenizer.model", 360)  # a stale tokenizer would win
    llama3.save_pretrained(target, model_max_length=64)
    assert sorted(path.name for path in target.iterdir()) == [
        "generation_config.json",  # a minimal one, for the end ids (a checkpoint writes the full one)
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert (target / "tokenizer.json").read_bytes() == (llama3_folder / "tokenizer.json").read_bytes()
    config = json.loads((target / "tokenizer_config.json").read_text())
    original = json.loads((llama3_folder / "tokenizer_config.json").read_text())
    assert config == {**original, "model_max_length": 64}
    reloaded = Tokenizer(target)
    assert (reloaded.sha256, reloaded.eos_ids) == (llama3.sha256, llama3.eos_ids)
    assert len(reloaded.eos_ids) == 3  # <|eot_id|>, <|end_of_text|>, <|eom_id|>
