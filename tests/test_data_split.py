"""The train/validation split: documents ranked by a keyed hash of their text, an exact count for a small
corpus, a per-document decision for a large one, with its corner cases (llama_mini.data.split)."""

import pytest

from llama_mini.data import cut_single_document, split_documents, validation_score
from llama_mini.data import split as split_module
from llama_mini.errors import ConfigError, DataError


@pytest.fixture
def large(monkeypatch):
    """Every corpus counts as large: the per-document rule, testable on a few documents."""
    monkeypatch.setattr(split_module, "SMALL_CORPUS_BYTES", 0)


DOCUMENTS = [f"document {i}" for i in range(40)]


def test_split_is_deterministic_disjoint_complete_and_in_order():
    train, val = split_documents(DOCUMENTS, val_fraction=0.2, seed=3)
    assert (train, val) == split_documents(DOCUMENTS, val_fraction=0.2, seed=3)
    assert sorted(train + val) == sorted(DOCUMENTS) and not set(train) & set(val)
    assert train == [d for d in DOCUMENTS if d in train] and val == [d for d in DOCUMENTS if d in val]


def test_the_seed_chooses_which_documents_validate():
    splits = {tuple(split_documents(DOCUMENTS, 0.2, seed)[1]) for seed in range(10)}
    assert len(splits) == 10


def test_a_small_corpus_validates_its_round_n_f_lowest_scoring_documents():
    _, val = split_documents(DOCUMENTS, 0.3, seed=5)
    lowest = sorted(DOCUMENTS, key=lambda d: validation_score(d.encode(), 5))[:12]  # round(40 * 0.3)
    assert val == [d for d in DOCUMENTS if d in lowest]


def test_a_large_corpus_validates_exactly_the_documents_scoring_below_the_fraction(large):
    _, val = split_documents(DOCUMENTS, 0.3, seed=5)
    assert val == [d for d in DOCUMENTS if validation_score(d.encode(), 5) < 0.3]


def test_in_a_large_corpus_other_documents_never_move_a_document_to_the_other_split(large):
    _, val = split_documents(DOCUMENTS, 0.2, seed=1)
    _, val_of_more = split_documents(DOCUMENTS + [f"added {i}" for i in range(40)], 0.2, seed=1)
    assert [d for d in val_of_more if d in DOCUMENTS] == val


@pytest.mark.parametrize("size", ["small", "large"])
def test_copies_of_a_document_land_in_the_same_split(monkeypatch, size):
    if size == "large":
        monkeypatch.setattr(split_module, "SMALL_CORPUS_BYTES", 0)
    train, val = split_documents(DOCUMENTS * 3, 0.25, seed=2)  # 30 of 120: 10 whole triples
    assert not set(train) & set(val)


def test_about_val_fraction_of_a_large_corpus_validates(large):
    many = [f"document {i}" for i in range(20_000)]
    _, val = split_documents(many, 0.1, seed=0)
    # binomial(20000, 0.1): standard deviation 42, so 5 sigma is about 210
    assert abs(len(val) - 2000) < 210


def test_a_corpus_is_small_up_to_64_mb_and_a_million_documents():
    assert split_module.is_small(64_000_000, 1_000_000)
    assert not split_module.is_small(64_000_001, 10) and not split_module.is_small(100, 1_000_001)


def test_scores_are_uniform_in_0_1():
    scores = [validation_score(f"d{i}".encode(), 7) for i in range(10_000)]
    assert 0 <= min(scores) and max(scores) < 1
    for quarter in range(4):
        share = sum(quarter / 4 <= s < (quarter + 1) / 4 for s in scores) / len(scores)
        assert share == pytest.approx(0.25, abs=0.02)


def test_in_a_large_corpus_when_no_document_scores_below_the_fraction_the_lowest_validates(large):
    documents = ["a", "b", "c"]
    scores = [validation_score(d.encode(), 0) for d in documents]
    fraction = min(scores) / 2  # nobody validates by score
    train, val = split_documents(documents, fraction, seed=0)
    assert val == [documents[scores.index(min(scores))]] and len(train) == 2


def test_in_a_large_corpus_when_every_document_scores_below_the_fraction_the_highest_trains(large):
    documents = ["a", "b", "c"]
    scores = [validation_score(d.encode(), 0) for d in documents]
    fraction = (max(scores) + 1) / 2  # everybody validates by score
    train, val = split_documents(documents, fraction, seed=0)
    assert train == [documents[scores.index(max(scores))]] and len(val) == 2


@pytest.mark.parametrize(
    ("count", "fraction", "n_val"), [(2, 0.01, 1), (2, 0.99, 1), (3, 0.5, 2), (10, 0.001, 1)]
)
def test_each_split_of_a_small_corpus_gets_at_least_one_document(count, fraction, n_val):
    train, val = split_documents([f"d{i}" for i in range(count)], fraction)
    assert (len(train), len(val)) == (count - n_val, n_val)


def test_a_single_document_is_cut_at_the_nearest_paragraph_end():
    paragraphs = [f"paragraph {i}.\nsecond line.\n\n" for i in range(10)]  # 27 characters each
    text = "".join(paragraphs)
    train, val = split_documents([text], val_fraction=0.2)
    assert train == ["".join(paragraphs[:8])] and val == ["".join(paragraphs[8:])]


def test_a_single_paragraph_is_cut_at_a_line_end_else_anywhere():
    assert cut_single_document("aaaa\nbbbb\ncccc\ndddd\n", 0.5) == ("aaaa\nbbbb\n", "cccc\ndddd\n")
    assert cut_single_document("abcdefghij", 0.3) == ("abcdefg", "hij")


def test_a_far_paragraph_end_gives_way_to_a_near_line_end():
    text = "title\n\n" + "".join(f"line {i}\n" for i in range(99))  # the only paragraph end is at 7
    train, val = cut_single_document(text, val_fraction=0.1)
    assert train + val == text
    assert train.endswith("\n") and 0.08 < len(val) / len(text) < 0.12


def test_a_single_character_cannot_be_split():
    with pytest.raises(DataError, match="single document of 1 character"):
        split_documents(["x"])


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_val_fraction_must_be_between_0_and_1(fraction):
    with pytest.raises(ConfigError, match="val_fraction must be between 0 and 1"):
        split_documents(DOCUMENTS, fraction)
