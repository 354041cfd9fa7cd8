"""Speculative decoding: greedy tokens equal plain greedy decoding's (so the KV caches roll back right), and
sampled tokens follow the model's exact distribution, computed by enumeration, whatever the draft proposes."""

import itertools
import math
import random
from collections import Counter

import pytest
import torch

from llama_mini.checkpoint import save_pretrained
from llama_mini.errors import ConfigError
from llama_mini.generation import GenerationError, command, generate
from llama_mini.generation.sampling import (
    apply_repetition_penalty,
    top_k_filter,
    top_p_filter,
)
from llama_mini.generation.speculative import (
    SpeculativeStats,
    iter_speculative,
    speculative_generate,
)
from llama_mini.model.presets import get_preset
from llama_mini.model.transformer import Transformer
from llama_mini.tokenizer import train_tokenizer

PROMPTS = [[1, 17, 42, 99, 5], [1], [1, 7, 7, 7, 7, 120]]


def random_model(seed: int, **overrides) -> Transformer:
    """A tiny model in float64 (so scoring K + 1 positions at once or one by one cannot swap an argmax),
    with random norm weights, so its logits are decisive."""
    torch.manual_seed(seed)
    model = Transformer(get_preset("tiny", **overrides)).double()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
    return model.eval()


@pytest.fixture(scope="module")
def target() -> Transformer:
    return random_model(0)


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: these models are a few thousand parameters, and on a shared machine threads mostly wait
    for each other at every tiny op (the test's results do not depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("draft_tokens", [1, 4])
@pytest.mark.parametrize("penalty", [None, 1.3])
def test_greedy_tokens_equal_plain_greedy_decoding(target, draft_tokens, penalty):
    """A draft that mostly disagrees (another random model: every round rolls both caches back) and the
    model as its own draft (every token accepted: the caches run K ahead) give plain greedy's tokens."""
    plain = generate(target, PROMPTS, 24, temperature=0, repetition_penalty=penalty)
    for draft in (random_model(1, n_layers=1), target):
        stats = SpeculativeStats()
        tokens = speculative_generate(
            target,
            draft,
            PROMPTS,
            24,
            temperature=0,
            repetition_penalty=penalty,
            draft_tokens=draft_tokens,
            stats=stats,
        )
        assert tokens == plain
        assert stats.new_tokens == 3 * 24
    # The last draft was the model itself: every proposal accepted, K + 1 tokens per forward pass.
    assert stats.accepted == stats.drafted > 0
    assert stats.rounds == sum(math.ceil(24 / (draft_tokens + 1)) for _ in PROMPTS)


def test_greedy_stops_at_an_eos_inside_an_accepted_run(target):
    """A stop id among the accepted tokens ends the row there, as in plain decoding."""
    plain = generate(target, PROMPTS[:1], 30, temperature=0)[0]
    eos = plain[7]
    expected = plain[: plain.index(eos)]
    tokens = speculative_generate(target, target, PROMPTS[:1], 30, temperature=0, eos_id=eos, draft_tokens=4)
    assert tokens == [expected]


VOCAB = 6  # small enough to enumerate every continuation of NEW tokens
NEW = 3
PROMPT = [1, 4]
SETTINGS = dict(temperature=0.9, top_k=5, top_p=0.95, repetition_penalty=1.4)


def exact_distribution(model: Transformer) -> dict[tuple[int, ...], float]:
    """P(the NEW tokens after PROMPT) under plain sampling with SETTINGS: the product of each position's
    probabilities, each from a full forward pass without a KV cache, written out here step by step."""
    probabilities = {}
    with torch.no_grad():
        for continuation in itertools.product(range(VOCAB), repeat=NEW):
            text, probability = list(PROMPT), 1.0
            for token in continuation:
                logits = model(torch.tensor([text]))[:, -1].float()  # (1, V)
                logits = apply_repetition_penalty(
                    logits, torch.tensor([text]), SETTINGS["repetition_penalty"]
                )
                logits = logits / SETTINGS["temperature"]
                logits = top_p_filter(top_k_filter(logits, SETTINGS["top_k"]), SETTINGS["top_p"])
                probability *= logits.softmax(-1)[0, token].item()
                text.append(token)
            probabilities[continuation] = probability
    return probabilities


def chi_square(counts: Counter, expected: dict, draws: int) -> tuple[float, int]:
    """Pearson's statistic and its degrees of freedom, the outcomes expected fewer than 5 times pooled."""
    small = [key for key, p in expected.items() if p * draws < 5]
    observed = {key: counts[key] for key in expected if key not in small}
    wanted = {key: expected[key] * draws for key in observed}
    if small:
        observed["pooled"] = sum(counts[key] for key in small)
        wanted["pooled"] = sum(expected[key] for key in small) * draws
    statistic = sum((observed[key] - wanted[key]) ** 2 / wanted[key] for key in wanted if wanted[key] > 0)
    return statistic, len(wanted) - 1


def chi_square_quantile(df: int, z: float) -> float:
    """Wilson and Hilferty's approximation of the chi-square quantile at the normal quantile z."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.slow
def test_sampled_tokens_follow_the_models_exact_distribution():
    """NEW tokens drawn speculatively (K = 2: rejections at either draft token, the residual and the bonus
    token all occur) are distributed as the model's own samples, computed exactly by enumeration; the
    same draws are far from the draft's own distribution, so the test can tell the two apart."""
    model = random_model(2, vocab_size=VOCAB).float()
    draft = random_model(3, vocab_size=VOCAB, n_layers=1).float()
    expected = exact_distribution(model)
    assert sum(expected.values()) == pytest.approx(1.0, abs=1e-5)
    draws = 3000
    stats = SpeculativeStats()
    samples = speculative_generate(
        model, draft, [PROMPT] * draws, NEW, draft_tokens=2, seed=0, stats=stats, **SETTINGS
    )
    counts = Counter(tuple(sample) for sample in samples)
    assert sum(counts.values()) == draws and all(len(key) == NEW for key in counts)
    # The draft is neither always right nor always wrong, so every branch of the rule runs.
    assert 0.2 < stats.acceptance_rate < 0.9
    statistic, df = chi_square(counts, expected, draws)
    assert statistic < chi_square_quantile(df, 4.0), (statistic, df)  # p about 3e-5
    statistic_vs_draft, _ = chi_square(counts, exact_distribution(draft), draws)
    assert statistic_vs_draft > 3 * chi_square_quantile(df, 4.0)


def test_a_draft_with_another_vocabulary_is_refused(target):
    draft = random_model(1, vocab_size=300)
    with pytest.raises(ConfigError, match="draft model's vocabulary has 300 tokens but the model's 256"):
        iter_speculative(target, draft, PROMPTS, 5)


def test_draft_tokens_below_one_is_refused(target):
    with pytest.raises(GenerationError, match="draft_tokens must be an integer >= 1"):
        iter_speculative(target, target, PROMPTS, 5, draft_tokens=0)


def test_a_draft_with_a_shorter_context_is_refused_before_the_first_token(target):
    draft = random_model(1, max_seq_len=16)
    with pytest.raises(GenerationError, match="do not fit the model's context of 16"):
        iter_speculative(target, draft, PROMPTS, 20)


def test_the_models_caches_are_left_as_found(target):
    """No KV cache before: none after; training mode restored."""
    draft = random_model(1, n_layers=1).train()
    speculative_generate(target, draft, PROMPTS, 5, temperature=0)
    assert all(layer.attention.cache is None for layer in [*target.layers, *draft.layers])
    assert draft.training and not target.training


# ---------------------------------------------------------------------------------------------------------
# The command: llama-mini generate --draft
# ---------------------------------------------------------------------------------------------------------


def save_model(folder, tokenizer_path, vocab_size: int, seed: int, n_layers: int):
    torch.manual_seed(seed)
    model = Transformer(get_preset("tiny", vocab_size=vocab_size, n_layers=n_layers))
    save_pretrained(model, folder, tokenizer_path=tokenizer_path)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A model, a draft with its tokenizer, and a draft with another tokenizer of the same size."""
    folder = tmp_path_factory.mktemp("speculative")
    rng = random.Random(0)
    words = ["the", "king", "queen", "and", "of", "my", "lord", "thee", "once", "upon", "a", "time"]
    text = "\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(300)) + "\n"
    tokenizer = train_tokenizer([text], folder / "tokenizer.model", 300)
    other = train_tokenizer([text.upper()], folder / "other" / "tokenizer.model", 300)
    assert other.vocab_size == tokenizer.vocab_size
    return {
        "model": save_model(folder / "model", folder / "tokenizer.model", tokenizer.vocab_size, 0, 2),
        "draft": save_model(folder / "draft", folder / "tokenizer.model", tokenizer.vocab_size, 1, 1),
        "other": save_model(
            folder / "other_draft", folder / "other" / "tokenizer.model", other.vocab_size, 1, 1
        ),
        "wide": save_model(folder / "wide", folder / "tokenizer.model", tokenizer.vocab_size + 8, 1, 1),
    }


def run_command(capsys, *argv) -> tuple[int, str, str]:
    code = command.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_with_a_draft_prints_the_greedy_text_of_plain_decoding(checkpoints, capsys):
    flags = ["--checkpoint", checkpoints["model"], "--prompt", "the king", "--prompt", "once upon"]
    flags += ["--temperature", "0", "--max-new-tokens", "20", "--dtype", "fp32", "--no-stream"]
    code, plain, _ = run_command(capsys, *flags, "--no-compile")
    assert code == 0
    code, speculative, err = run_command(
        capsys, *flags, "--draft", checkpoints["draft"], "--draft-tokens", "3"
    )
    assert code == 0 and speculative == plain, err
    code, _, err = run_command(capsys, *flags, "--draft", checkpoints["draft"], "--verbose")
    assert code == 0 and "draft: " in err and "tokens accepted" in err


@pytest.mark.parametrize(
    ("draft", "message"),
    [
        ("other", "has another tokenizer than the model's"),
        ("wide", "vocabulary has 308 tokens but the model's 300"),
    ],
)
def test_a_draft_with_another_tokenizer_is_one_line_and_exit_2(checkpoints, capsys, draft, message):
    code, out, err = run_command(
        capsys, "--checkpoint", checkpoints["model"], "--draft", checkpoints[draft], "--prompt", "the"
    )
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err, err
