"""Weighted mixtures (llama_mini.data.mixture): parsing --data SOURCE:WEIGHT, rows in proportion to the
weights as a pure function of (seed, row), each row from its own source, and the epoch count per source."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llama_mini.data.mixture import (
    MixedSplits,
    get_mixture_batch,
    parse_mixture,
    rows_per_source,
    source_of_rows,
)
from llama_mini.errors import ConfigError
from llama_mini.train import TrainConfig
from llama_mini.train.trainer import SourceEpochs

OFFSET = 1000  # source k holds token ids k * OFFSET .. k * OFFSET + OFFSET - 1, so a row names its source


class ArraySplit:
    """A training split in memory with TokenSplit's interface as get_batch reads it."""

    chat = None

    def __init__(self, tokens: np.ndarray):
        self.tokens = tokens
        self.meta = SimpleNamespace(split="train")
        self.folder = "memory"

    def __len__(self) -> int:
        return len(self.tokens)

    def windows(self, starts: np.ndarray, window: int) -> np.ndarray:
        return self.tokens[np.asarray(starts)[:, None] + np.arange(window)]


def array_splits(lengths: list[int]) -> list[ArraySplit]:
    rng = np.random.default_rng(0)
    return [ArraySplit(k * OFFSET + rng.integers(0, OFFSET, n)) for k, n in enumerate(lengths)]


def row_sources(x: torch.Tensor) -> np.ndarray:
    """The source each row came from, read off its token ids (every id of a row is from one source)."""
    low, high = (x.min(dim=1).values // OFFSET).numpy(), (x.max(dim=1).values // OFFSET).numpy()
    assert (low == high).all()
    return low


WEIGHTS_LINE = ["fineweb/:0.7", "code.jsonl:0.2", "shakespeare:0.1"]


def test_a_mixture_line_gives_names_specs_and_normalised_weights():
    sources = parse_mixture(["fineweb/:7", "code.jsonl:2", "shakespeare:1", "hf:wikitext:wikitext-2-raw-v1"])
    assert [s.name for s in sources] == ["fineweb", "code", "shakespeare", "wikitext_wikitext-2-raw-v1"]
    assert [s.spec for s in sources][1:] == ["code.jsonl", "shakespeare", "hf:wikitext:wikitext-2-raw-v1"]
    # a source without a weight weighs 1; the weights are divided by their sum, 7 + 2 + 1 + 1
    assert [s.weight for s in sources] == pytest.approx([7 / 11, 2 / 11, 1 / 11, 1 / 11])
    assert parse_mixture("shakespeare")[0].weight == 1.0


@pytest.mark.parametrize(
    "entries, message",
    [
        (["a.txt:0", "b.txt:1"], "--data a.txt:0: a weight must be a positive number, got 0"),
        (["a.txt:-1", "b.txt"], "a weight must be a positive number, got -1"),
        (["a.txt:nan", "b.txt"], "a weight must be a positive number, got nan"),
        (["a.txt:inf", "b.txt"], "a weight must be a positive number, got inf"),
        (["x/a.txt:1", "y/a.txt:2"], "--data x/a.txt:1 and --data y/a.txt:2 are both named 'a'"),
    ],
)
def test_bad_weights_and_duplicate_names_are_refused_in_one_line(entries, message):
    with pytest.raises(ConfigError) as error:
        TrainConfig(data=entries)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_weight_that_is_not_a_number_after_an_existing_file_is_named(tmp_path):
    (tmp_path / "code.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ConfigError, match="the weight 'lots' is not a number"):
        parse_mixture([f"{tmp_path}/code.jsonl:lots", "shakespeare"])


def test_one_source_keeps_the_plain_string_record_and_a_mixture_is_a_list():
    assert TrainConfig(data=["shakespeare"]).data == "shakespeare"
    assert TrainConfig(data=["shakespeare"]).to_dict()["data"] == "shakespeare"
    assert TrainConfig(data=WEIGHTS_LINE).to_dict()["data"] == WEIGHTS_LINE
    assert TrainConfig.from_dict({"data": WEIGHTS_LINE}).data == WEIGHTS_LINE


def test_three_sources_get_their_weights_share_of_rows_within_one_percent():
    sources = parse_mixture(WEIGHTS_LINE)
    splits = array_splits([5000, 3000, 2000])
    counts = np.zeros(3, dtype=np.int64)
    steps, batch_size = 100, 256  # 25,600 rows: drawing rows at random would be off by ~2% for 0.1
    for step in range(steps):
        x, y = get_mixture_batch(splits, sources, batch_size, 8, step, seed=5)
        assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted, within the one source's window
        counts += np.bincount(row_sources(x), minlength=3)
    shares = counts / counts.sum()
    for share, weight in zip(shares, [0.7, 0.2, 0.1], strict=True):
        assert abs(share - weight) <= 0.01 * weight, (shares, counts)
    # the counting the epochs use agrees with the rows the batches hold
    assert rows_per_source([0.7, 0.2, 0.1], 5, steps * batch_size, chunk=1000).tolist() == counts.tolist()


def test_a_mixture_batch_is_a_pure_function_and_ranks_share_one_batch():
    sources, splits = parse_mixture(WEIGHTS_LINE), array_splits([500, 400, 300])
    whole_x, whole_y = get_mixture_batch(splits, sources, 8, 6, step=17, seed=3)
    again_x, _ = get_mixture_batch(splits, sources, 8, 6, step=17, seed=3)
    assert torch.equal(whole_x, again_x)
    halves = [get_mixture_batch(splits, sources, 4, 6, 17, 3, rank=r, world_size=2) for r in (0, 1)]
    assert torch.equal(torch.cat([h[0] for h in halves]), whole_x)
    assert torch.equal(torch.cat([h[1] for h in halves]), whole_y)
    other_seed, _ = get_mixture_batch(splits, sources, 8, 6, step=17, seed=4)
    other_step, _ = get_mixture_batch(splits, sources, 8, 6, step=18, seed=3)
    assert not torch.equal(other_seed, whole_x) and not torch.equal(other_step, whole_x)


def test_source_of_rows_is_the_same_whichever_block_of_rows_is_asked_for():
    weights = [0.5, 0.3, 0.2]
    whole = source_of_rows(weights, 9, 0, 1000)
    parts = np.concatenate([source_of_rows(weights, 9, first, 100) for first in range(0, 1000, 100)])
    assert whole.tolist() == parts.tolist()


def test_each_source_logs_a_new_epoch_when_its_drawn_tokens_pass_its_split():
    sources = parse_mixture(["big:3", "small:1"])
    splits = array_splits([4000, 300])
    mixture = MixedSplits(sources, splits)
    seq_len, batch_size, grad_accum, steps = 8, 4, 2, 120
    config = SimpleNamespace(seed=1, batch_size=batch_size, grad_accum=grad_accum)
    # What should be logged, counted from the rows the batches hold: epoch E of a source begins at the
    # first step after which (E - 1) * its split's tokens have been drawn from it.
    drawn, expected = np.zeros(2, dtype=np.int64), []
    for step in range(1, steps + 1):
        for micro in range(grad_accum):  # the trainer's micro-batches: (step - 1) * grad_accum + micro
            x, _ = get_mixture_batch(splits, sources, batch_size, seq_len, (step - 1) * grad_accum + micro, 1)
            drawn += np.bincount(row_sources(x), minlength=2) * seq_len
        for k, name in enumerate(("big", "small")):
            epoch = 1 + int(drawn[k]) // len(splits[k])
            if not any(line[0] == name and line[1] == epoch for line in expected) and epoch > 1:
                expected.append((name, epoch, step))
    # 120 steps * 8 rows * 8 tokens = 7,680 tokens; small's quarter, ~1,920, is 6 times its 300
    assert [epoch for name, epoch, _ in expected if name == "small"] == [2, 3, 4, 5, 6, 7]
    assert [epoch for name, epoch, _ in expected if name == "big"] == [2]  # 3/4 of 7,680 over 4,000

    def logged(epochs: SourceEpochs, first_step: int) -> list[tuple[str, int, int]]:
        lines = []
        for step in range(first_step, steps + 1):
            for line in epochs.after_step(step):
                words = line.split()  # data: NAME begins epoch E at step S (...)
                assert words[2:4] == ["begins", "epoch"] and int(words[7]) == step
                lines.append((words[1], int(words[4]), step))
        return lines

    assert sorted(logged(SourceEpochs(mixture, config, seq_len, start_step=0), 1)) == sorted(expected)
    # a resumed run counts the rows before its first step again and logs the same lines from there on
    resumed = logged(SourceEpochs(mixture, config, seq_len, start_step=60), 61)
    assert sorted(resumed) == sorted(line for line in expected if line[2] > 60)
