"""The tokenizer trains deterministically, round-trips any text exactly, and streams what decode returns."""

import hashlib
import io
import random

import pytest
import sentencepiece as spm

from llama_mini.errors import DataError
from llama_mini.tokenizer import StreamDecoder, Tokenizer, train_tokenizer
from llama_mini.tokenizer.training import _training_sentences

VOCAB_SIZE = 360  # 259 byte and special pieces, the corpus's ~50 characters, and some merges

WORDS = [
    "the",
    "king",
    "queen",
    "naïve",
    "café",
    "—",
    "東京",
    "🙂",
    "and",
    "of",
    "my",
    "lord",
    "thee",
    "thou",
]


def synthetic_corpus() -> list[str]:
    """About 12 KB of text with unicode, tabs, space runs, blank lines and numbers, the same every time."""
    rng = random.Random(0)
    documents = []
    for number in range(20):
        lines = [f"ACT {number}. Scene {rng.randint(0, 99999)}", ""]
        for line in range(10):
            words = " ".join(rng.choice(WORDS) for _ in range(8))
            indent = "\t" if line % 4 == 0 else "    " if line % 4 == 1 else ""
            lines.append(indent + words + ("  " if line % 3 == 0 else ""))
            if line % 5 == 4:
                lines += ["", ""]
        documents.append("\n".join(lines) + "\n")
    return documents


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return train_tokenizer(synthetic_corpus(), tmp_path_factory.mktemp("tok") / "tokenizer.model", VOCAB_SIZE)


ROUND_TRIP_TEXTS = [
    "naïve café — 東京 🙂",
    "  two leading spaces and two trailing  ",
    " one leading space",
    "\n\nstarts with blank lines\n\n\nand ends with a newline\n",
    "tabs\tand\t\ttwo tabs",
    "runs of     spaces   inside",
    "🦙 한국어: characters never seen in training",
    "digits 0123456789 and 3.14159",
    "windows\r\nline end",
    "\n",
    " ",
    "",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_decode_of_encode_is_the_text_exactly(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_ids_are_llama_s(tokenizer):
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, -1)
    assert [tokenizer.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert tokenizer.vocab_size == VOCAB_SIZE


def test_bos_and_eos_are_added_only_when_asked(tokenizer):
    plain = tokenizer.encode("the king")
    assert tokenizer.bos_id not in plain and tokenizer.eos_id not in plain
    assert tokenizer.encode("the king", bos=True) == [1, *plain]
    assert tokenizer.encode("the king", eos=True) == [*plain, 2]
    assert tokenizer.encode("the king", bos=True, eos=True) == [1, *plain, 2]
    assert tokenizer.decode([1, *plain, 2]) == "the king"


def test_encode_batch_equals_encode_one_by_one(tokenizer):
    texts = ["the king", "東京 🙂\n", "  thou"]
    assert tokenizer.encode_batch(texts, bos=True, eos=True) == [
        tokenizer.encode(t, True, True) for t in texts
    ]


def test_digits_are_split_into_single_digit_pieces(tokenizer):
    pieces = [tokenizer.id_to_piece(i) for i in tokenizer.encode("20240915")]
    digits = [piece.replace("▁", "") for piece in pieces if piece != "▁"]
    assert digits == list("20240915")


def test_unknown_characters_fall_back_to_their_utf8_bytes(tokenizer):
    pieces = [tokenizer.id_to_piece(i) for i in tokenizer.encode("🦙")]
    assert pieces == ["▁", "<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]  # 🦙 is F0 9F A6 99 in UTF-8


def test_newlines_are_learned_pieces_not_bytes(tokenizer):
    pieces = [tokenizer.id_to_piece(i) for i in tokenizer.encode("thou\nthee\n\nking")]
    assert "<0x0A>" not in pieces
    assert "".join(pieces).count("\n") == 3


def test_sha256_is_the_digest_of_the_model_file(tokenizer):
    assert tokenizer.sha256 == hashlib.sha256(tokenizer.model_path.read_bytes()).hexdigest()


def test_training_is_deterministic(tmp_path, tokenizer):
    again = train_tokenizer(synthetic_corpus(), tmp_path / "again.model", VOCAB_SIZE)
    assert again.model_path.read_bytes() == tokenizer.model_path.read_bytes()
    assert again.sha256 == tokenizer.sha256
    text = "naïve queen of 東京, 12 lords\n\tthou"
    assert again.encode(text) == tokenizer.encode(text)


def test_training_accepts_a_generator_and_leaves_only_the_model(tmp_path):
    out = tmp_path / "sub" / "tokenizer.model"
    trained = train_tokenizer((document for document in synthetic_corpus()), out, VOCAB_SIZE)
    assert sorted(path.name for path in out.parent.iterdir()) == ["tokenizer.model"]  # no temporary file left
    assert trained.model_path == out and trained.vocab_size == VOCAB_SIZE


def test_too_large_vocab_says_to_lower_it_and_writes_nothing(tmp_path):
    out = tmp_path / "tokenizer.model"
    with pytest.raises(
        DataError, match=r"vocab_size 50000 is too large .* at most \d+ pieces: lower --vocab-size"
    ):
        train_tokenizer(synthetic_corpus(), out, vocab_size=50000)
    assert not out.exists()


def test_too_small_vocab_says_to_raise_it(tmp_path):
    with pytest.raises(DataError, match=r"vocab_size 100 is too small.*at least 260"):
        train_tokenizer(synthetic_corpus(), tmp_path / "a.model", vocab_size=100)
    # Above the 259 fixed pieces but below what the corpus's characters need: sentencepiece's own check.
    with pytest.raises(
        DataError, match=r"vocab_size 265 is too small for this corpus, which needs \d+ pieces"
    ):
        train_tokenizer(synthetic_corpus(), tmp_path / "b.model", vocab_size=265)


def test_empty_corpus_is_an_error(tmp_path):
    with pytest.raises(DataError, match="empty corpus"):
        train_tokenizer(["", ""], tmp_path / "tokenizer.model", VOCAB_SIZE)


def test_missing_model_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "tokenizer.model"
    with pytest.raises(DataError, match=f"cannot read tokenizer model {missing}"):
        Tokenizer(missing)


def test_corrupt_model_file_names_the_path(tmp_path):
    corrupt = tmp_path / "tokenizer.model"
    corrupt.write_bytes(b"not a protobuf" * 10)
    with pytest.raises(DataError, match=f"{corrupt} is not a valid sentencepiece model"):
        Tokenizer(corrupt)


def test_loads_a_sentencepiece_model_trained_elsewhere(tmp_path):
    """Any .model file loads, with its own special ids (here a unigram model with a pad id, no bytes)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(synthetic_corpus()),
        model_writer=model,
        model_type="unigram",
        vocab_size=80,
        pad_id=3,
        minloglevel=2,
    )
    path = tmp_path / "other.model"
    path.write_bytes(model.getvalue())
    other = Tokenizer(path)
    assert (other.bos_id, other.eos_id, other.pad_id, other.vocab_size) == (1, 2, 3, 80)
    assert other.decode(other.encode("the king and the queen")) == "the king and the queen"


def stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    decoder = tokenizer.stream_decoder()
    return [decoder.push(token_id) for token_id in ids] + [decoder.flush()]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_streamed_pieces_concatenate_to_the_full_decode(tokenizer, text):
    ids = tokenizer.encode(text, bos=True)
    assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids) == text


def test_stream_holds_back_a_character_until_its_last_byte(tokenizer):
    ids = tokenizer.encode("thou 🦙 king")
    first_byte = ids.index(tokenizer.encode("🦙")[1])  # <0xF0>, then <0x9F> <0xA6> <0x99>
    pieces = stream(tokenizer, ids)
    assert pieces[first_byte : first_byte + 4] == ["", "", "", "🦙"]
    assert "".join(pieces) == "thou 🦙 king"


def test_stream_matches_decode_on_random_ids(tokenizer):
    """Random id sequences, rich in byte pieces (broken UTF-8 included), bos/eos and <unk>."""
    rng = random.Random(0)
    byte_ids = [i for i in range(tokenizer.vocab_size) if tokenizer.id_to_piece(i).startswith("<0x")]

    def random_id() -> int:
        draw = rng.random()
        if draw < 0.4:
            return rng.choice(byte_ids)
        if draw < 0.55:
            return rng.choice([0, 1, 2])  # <unk>, bos, eos
        return rng.randrange(tokenizer.vocab_size)

    for _ in range(300):
        ids = [random_id() for _ in range(rng.randint(1, 30))]
        assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids), ids


def test_stream_decodes_a_short_window_not_the_whole_prefix(tokenizer):
    """Each push re-decodes only ids since the last emitted text, so its cost does not grow with length."""

    class CountingTokenizer:
        def __init__(self):
            self.longest = 0

        def decode(self, ids):
            self.longest = max(self.longest, len(ids))
            return tokenizer.decode(ids)

    counting = CountingTokenizer()
    decoder = StreamDecoder(counting)
    ids = tokenizer.encode("the king and the queen of 東京 " * 60)
    text = "".join(decoder.push(token_id) for token_id in ids) + decoder.flush()
    assert text == tokenizer.decode(ids)
    assert len(ids) > 300 and counting.longest <= 4


def test_training_sample_is_spread_evenly_over_a_large_corpus():
    documents = [f"document {i:02d}\n" for i in range(100)]
    sample = list(_training_sentences(documents, max_characters=len("".join(documents)) // 4))
    assert sample == [f"document {i:02d}\n" for i in range(3, 100, 4)]
    assert list(_training_sentences(documents, max_characters=10**9)) == documents


# ---------------------------------------------------------------------------------------------------------
# A tokenizer.model in a checkpoint folder
# ---------------------------------------------------------------------------------------------------------


def test_a_folder_loads_its_tokenizer_model(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    loaded = Tokenizer(tmp_path)
    assert loaded.model_path == tmp_path / "tokenizer.model" and loaded.sha256 == tokenizer.sha256
    assert loaded.special_token_names == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    assert (loaded.eos_ids, loaded.add_bos, loaded.chat_template) == ((2,), True, None)


def test_a_folder_without_a_tokenizer_says_what_is_missing(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path} has no tokenizer.model or tokenizer.json: pass"):
        Tokenizer(tmp_path)


def test_end_ids_and_chat_template_are_read_beside_the_model(tmp_path, tokenizer):
    (tmp_path / "tokenizer.model").write_bytes(tokenizer.model_path.read_bytes())
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [5, 2, 7]}')
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    (tmp_path / "tokenizer_config.json").write_text('{"add_bos_token": false}')
    loaded = Tokenizer(tmp_path / "tokenizer.model")
    assert loaded.eos_ids == (2, 5, 7)  # eos_id first, then the list without repeats
    assert (loaded.chat_template, loaded.add_bos) == ("{{ messages }}", False)
    assert loaded.sha256 == tokenizer.sha256  # the files beside the model do not change what it encodes


def test_unreadable_generation_config_is_a_clear_error(tmp_path, tokenizer):
    (tmp_path / "tokenizer.model").write_bytes(tokenizer.model_path.read_bytes())
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": "two"}')
    with pytest.raises(DataError, match=r"eos_token_id 'two' is not a token id or a list of them"):
        Tokenizer(tmp_path)
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(DataError, match=r"generation_config.json cannot be read as JSON"):
        Tokenizer(tmp_path)


def test_parse_special_turns_control_pieces_into_their_ids(tokenizer):
    text = "<s>the king</s>"
    assert tokenizer.encode(text, parse_special=True) == tokenizer.encode("the king", bos=True, eos=True)
    assert tokenizer.decode(tokenizer.encode(text)) == text  # without parse_special, text is text
