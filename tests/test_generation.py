"""Generation: the sampling helpers on crafted logits, the KV-cached ragged decode loop against full
recomputation, each prompt alone and transformers, and streaming text against the tokenizer's decode."""

import random

import pytest
import torch
from torch._dynamo.utils import counters

from llama_mini.checkpoint import save_pretrained
from llama_mini.generation import (
    DecodeOptions,
    GenerationError,
    GenerationStats,
    apply_repetition_penalty,
    apply_temperature,
    decode,
    decode_continuation,
    fit_to_context,
    generate,
    iter_new_tokens,
    row_seed,
    sample_next,
    steps,
    stream,
    top_k_filter,
    top_p_filter,
)
from llama_mini.generation.decode import resolve_settings
from llama_mini.generation.sampling import SamplingConfig
from llama_mini.model.presets import get_preset
from llama_mini.model.transformer import Transformer
from llama_mini.ops import aot_step
from llama_mini.tokenizer import train_tokenizer

INF = float("inf")

# Prompts of different lengths (a ragged batch); every one starts with BOS (1), as the CLI's do.
PROMPTS = [[1, 17, 42, 99, 5, 8, 61, 200, 3], [1, 250], [1, 7, 7, 7, 7, 120], [1]]


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    """The tiny preset with random norm weights too, so logits are decisive enough for argmax to be stable."""
    torch.manual_seed(seed)
    model = Transformer(get_preset("tiny", **overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
    return model.eval()


@pytest.fixture(scope="module")
def model() -> Transformer:
    return tiny_model()


def greedy_by_recomputation(
    model: Transformer, prompt: list[int], steps: int, penalty: float = 1.0
) -> list[int]:
    """The reference: no cache, the whole sequence through the model for every new token."""
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([sequence]))[:, -1]
            if penalty != 1.0:
                logits = apply_repetition_penalty(logits, torch.tensor([sequence]), penalty)
            sequence.append(int(logits.argmax()))
    return sequence[len(prompt) :]


# ------------------------------------------------------------------------------------- sampling helpers


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    assert top_k_filter(logits, 2).tolist() == [[-INF, 5.0, -INF, 4.0, -INF]]
    assert top_k_filter(logits, 1).tolist() == [[-INF, 5.0, -INF, -INF, -INF]]


def test_top_k_keeps_every_token_tied_with_the_kth():
    logits = torch.tensor([[2.0, 7.0, 2.0, 2.0, 1.0], [0.5, 0.5, 0.5, 0.5, 0.5]])
    # Row 0: the 2nd largest value is 2.0, held by three tokens: all three stay (4 kept for k=2).
    # Row 1: all equal: nothing is cut, whatever order topk lists the ties in.
    assert top_k_filter(logits, 2).tolist() == [[2.0, 7.0, 2.0, 2.0, -INF], [0.5] * 5]


def test_top_k_at_least_the_vocabulary_changes_nothing():
    logits = torch.randn(3, 7)
    assert torch.equal(top_k_filter(logits, 7), logits)
    assert torch.equal(top_k_filter(logits, 100), logits)


def test_top_p_keeps_the_token_that_crosses_p():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(4, 4)  # probabilities 0.5, 0.3, 0.15, 0.05
    ps = [0.45, 0.6, 0.81, 0.99]
    kept = [
        torch.isfinite(top_p_filter(row[None], p)).sum().item() for row, p in zip(logits, ps, strict=True)
    ]
    # 0.45: the first token alone reaches it; 0.6: 0.5 + 0.3 crosses it; 0.81: 0.5 + 0.3 = 0.8 is short,
    # so the 0.15 token that crosses it stays; 0.99: all four are needed.
    assert kept == [1, 2, 3, 4]


def test_top_p_keeps_the_most_likely_token_for_any_p():
    logits = torch.tensor([[3.0, 1.0, 0.0]])
    assert top_p_filter(logits, 1e-9).tolist() == [[3.0, -INF, -INF]]
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_top_p_keeps_every_token_tied_with_the_last_kept():
    # Probabilities 0.4, 0.2, 0.2, 0.2: p = 0.5 is crossed by the second token, and the other two tokens
    # of 0.2 are tied with it, so all four stay, in whatever order the sort put the ties.
    logits = torch.tensor([[0.2, 0.4, 0.2, 0.2]]).log()
    assert torch.isfinite(top_p_filter(logits, 0.5)).tolist() == [[True, True, True, True]]


def test_top_k_and_top_p_agree_with_transformers_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(8, 50) * 3  # continuous values: no ties, so the two tie rules cannot differ
    for k in (1, 5, 49):
        expected = TopKLogitsWarper(top_k=k)(None, logits.clone())
        assert torch.equal(top_k_filter(logits, k), expected)
    for p in (0.1, 0.5, 0.9):
        expected = TopPLogitsWarper(top_p=p)(None, logits.clone())
        assert torch.equal(torch.isfinite(top_p_filter(logits, p)), torch.isfinite(expected))


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.5]])
    previous = torch.tensor([[0, 1, 0], [3, 3, 3]])  # a repeated id is penalised once
    penalised = apply_repetition_penalty(logits, previous, 2.0)
    assert penalised.tolist() == [[1.0, -4.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.25]]


def test_repetition_penalty_agrees_with_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(1)
    logits, previous = torch.randn(3, 40), torch.randint(0, 40, (3, 12))
    expected = RepetitionPenaltyLogitsProcessor(1.3)(previous, logits.clone())
    assert torch.equal(apply_repetition_penalty(logits, previous, 1.3), expected)


def test_temperature_divides_the_logits():
    assert apply_temperature(torch.tensor([[1.0, -3.0]]), 0.5).tolist() == [[2.0, -6.0]]


def test_temperature_zero_is_argmax_with_the_lowest_id_among_ties():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, 0.0, 0.0, 5.0]])
    assert sample_next(logits, temperature=0.0, top_k=3, top_p=0.5).tolist() == [1, 0]


def test_sampling_frequencies_follow_the_filtered_softmax():
    # Probabilities 0.5, 0.25, 0.125, 0.125; top_k=3 keeps the first three (0.125 is tied at the 3rd value:
    # both 0.125 tokens stay, so nothing is cut), top_p=0.7 keeps 0.5 + 0.25 and renormalises to 2/3, 1/3.
    logits = torch.tensor([0.5, 0.25, 0.125, 0.125]).log().expand(30000, 4)
    generator = torch.Generator().manual_seed(0)
    tokens = sample_next(logits, temperature=1.0, top_k=3, top_p=0.7, generator=generator)
    frequencies = torch.bincount(tokens, minlength=4) / tokens.numel()
    assert frequencies[2:].tolist() == [0.0, 0.0]
    assert frequencies[:2].tolist() == pytest.approx([2 / 3, 1 / 3], abs=0.01)
    # temperature 2 flattens: softmax(log p / 2) is proportional to sqrt(p)
    tokens = sample_next(logits, temperature=2.0, generator=generator)
    root = torch.tensor([0.5, 0.25, 0.125, 0.125]).sqrt()
    frequencies = torch.bincount(tokens, minlength=4) / tokens.numel()
    assert frequencies.tolist() == pytest.approx((root / root.sum()).tolist(), abs=0.01)


def test_per_row_generators_make_each_row_independent_of_the_others():
    torch.manual_seed(2)
    logits = torch.randn(3, 30)
    together = sample_next(logits, generator=[torch.Generator().manual_seed(seed) for seed in (5, 6, 7)])
    alone = [
        sample_next(logits[[row]], generator=torch.Generator().manual_seed(seed))
        for row, seed in enumerate((5, 6, 7))
    ]
    assert together.tolist() == torch.cat(alone).tolist()


def test_row_seed_is_a_fixed_well_mixed_63_bit_value():
    seeds = {row_seed(seed, row) for seed in range(4) for row in range(4)}
    assert len(seeds) == 16  # in particular row_seed(1, 0) != row_seed(0, 1)
    assert all(0 <= seed < 2**63 for seed in seeds)
    assert max(seeds) >= 2**62  # the top bit is used: 16 values below 2**62 would have odds 2**-16
    # Fixed: the same in every process, release and platform, so a --seed reproduces yesterday's samples.
    # These values are SeedSequence([seed, row]).generate_state(1, uint64) >> 1 as numpy defines it.
    assert row_seed(3, 2) == 5737856171534892084
    assert (row_seed(0, 1), row_seed(1, 0)) == (2918264622725855778, 3717377837946358015)


# ------------------------------------------------------------------------------------- the decode loop


def test_greedy_with_the_cache_equals_greedy_by_full_recomputation(model):
    for prompt in PROMPTS:
        assert generate(model, [prompt], 12, temperature=0) == [greedy_by_recomputation(model, prompt, 12)]


def test_ragged_batch_equals_each_prompt_alone_greedy(model):
    batch = generate(model, PROMPTS, 10, temperature=0)
    assert batch == [generate(model, [prompt], 10, temperature=0)[0] for prompt in PROMPTS]
    assert [len(new) for new in batch] == [10, 10, 10, 10]


def test_ragged_batch_equals_each_prompt_alone_sampled(model):
    # Row i of a batch seeded with s samples with row_seed(s, i): give a prompt alone that seed and it
    # draws the very same tokens, whatever the other rows were.
    settings = dict(temperature=1.0, top_k=50, top_p=0.95)
    batch = generate(model, PROMPTS, 10, seed=123, **settings)
    for row, prompt in enumerate(PROMPTS):
        assert batch[row] == generate(model, [prompt], 10, seed=[row_seed(123, row)], **settings)[0]
    reordered = generate(
        model, PROMPTS[::-1], 10, seed=[row_seed(123, row) for row in range(4)][::-1], **settings
    )
    assert reordered == batch[::-1]


def test_the_same_seed_gives_the_same_sample_and_another_seed_another(model):
    first = generate(model, PROMPTS, 16, temperature=1.0, seed=7)
    assert generate(model, PROMPTS, 16, temperature=1.0, seed=7) == first
    assert generate(model, PROMPTS, 16, temperature=1.0, seed=8) != first
    torch.manual_seed(0)  # no seed: drawn from torch's global generator, so repeatable under manual_seed
    unseeded = generate(model, PROMPTS, 16, temperature=1.0)
    torch.manual_seed(0)
    assert generate(model, PROMPTS, 16, temperature=1.0) == unseeded


def test_eos_stops_its_row_and_is_not_returned(model):
    free = generate(model, PROMPTS, 10, temperature=0)
    eos = free[1][4]  # row 1's fifth token: row 1 must stop after four tokens
    stopped = generate(model, PROMPTS, 10, temperature=0, eos_id=eos)
    for row in range(4):
        expected = free[row][: free[row].index(eos)] if eos in free[row] else free[row]
        assert stopped[row] == expected
    assert stopped[1] == free[1][:4]


def test_max_new_tokens_zero_returns_empty_lists_without_running_the_model(model, monkeypatch):
    monkeypatch.setattr(model, "hidden_states", lambda *args: pytest.fail("the model ran"))
    assert generate(model, PROMPTS, 0) == [[], [], [], []]
    assert generate(model, [], 5) == []


def test_repetition_penalty_in_the_loop_equals_the_reference(model):
    expected = [greedy_by_recomputation(model, prompt, 12, penalty=1.5) for prompt in PROMPTS]
    assert generate(model, PROMPTS, 12, temperature=0, repetition_penalty=1.5) == expected
    # The penalty did change something: some row repeats a token without it (which row depends on the
    # random weights), and the penalty breaks the repetition.
    assert expected != [greedy_by_recomputation(model, prompt, 12) for prompt in PROMPTS]


def test_greedy_equals_transformers_generate_on_the_same_weights(model, tmp_path):
    from transformers import GenerationConfig, LlamaForCausalLM

    save_pretrained(model, tmp_path / "checkpoint")
    hf_model = LlamaForCausalLM.from_pretrained(tmp_path / "checkpoint").eval()
    for penalty in (1.0, 1.3):
        # No eos, so neither side can stop early; the batch is ragged on our side, one prompt at a time there.
        config = GenerationConfig(
            do_sample=False, max_new_tokens=12, eos_token_id=None, pad_token_id=0, repetition_penalty=penalty
        )
        ours = generate(model, PROMPTS, 12, temperature=0, repetition_penalty=penalty)
        for prompt, new_ids in zip(PROMPTS, ours, strict=True):
            ids = torch.tensor([prompt])
            theirs = hf_model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
            assert theirs[0, len(prompt) :].tolist() == new_ids


def test_an_existing_cache_is_reused_and_kept_a_new_one_removed(model):
    model.train()
    generate(model, PROMPTS, 3, temperature=0)
    assert model.training  # restored after running in eval mode
    assert all(layer.attention.cache is None for layer in model.layers)
    model.eval()
    model.setup_cache(max_batch_size=8)
    cache = model.layers[0].attention.cache
    try:
        assert generate(model, PROMPTS, 5, temperature=0) == generate(
            model, PROMPTS[:2], 5, temperature=0
        ) + generate(model, PROMPTS[2:], 5, temperature=0)
        assert model.layers[0].attention.cache is cache
    finally:
        model.clear_cache()


def test_next_token_logits_are_the_last_positions_logits(model):
    tokens = torch.tensor([PROMPTS[0], PROMPTS[0][::-1]])
    with torch.no_grad():
        expected = model(tokens)[:, -1]
        # float32's default tolerances: W @ h^T on a CPU adds the same products as h @ W^T in another
        # order, an error set by the size of the terms (about 1), not by the logit, which may be near 0.
        torch.testing.assert_close(decode.next_token_logits(model, tokens, 0), expected)


def test_the_kv_cache_is_sized_to_the_request_and_grows_when_needed():
    model = tiny_model(max_seq_len=1024)
    assert steps.ensure_cache(model, batch=2, length=300)  # none before: made here, for the caller to remove
    assert model.layers[0].attention.cache.k_cache.shape[::2] == (2, 512)  # 300 rounded up to 2 x 256
    cache = model.layers[0].attention.cache
    assert not steps.ensure_cache(model, batch=1, length=100)  # fits: kept as it is
    assert model.layers[0].attention.cache is cache
    assert not steps.ensure_cache(model, batch=3, length=600)  # too small: replaced by a larger one, kept
    assert model.layers[0].attention.cache.k_cache.shape[::2] == (3, 768)
    assert not steps.ensure_cache(model, batch=1, length=1000)  # grows to the context, never past it
    assert model.layers[0].attention.cache.k_cache.shape[::2] == (3, 1024)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decode_gives_the_tokens_of_eager_decode_on_a_gpu():
    model = tiny_model().cuda()
    eager = generate(model, PROMPTS, 20, temperature=0)
    assert generate(model, PROMPTS, 20, temperature=0, compile=True) == eager
    assert generate(model, PROMPTS, 20, temperature=0, compile=True, cuda_graphs=False) == eager


def test_stats_count_prefill_and_decode_positions(model):
    stats = GenerationStats()
    new_ids = generate(model, PROMPTS, 6, temperature=0, stats=stats)
    # Prefill covers the shortest prompt (1 token) in all 4 rows; the decode steps run until the longest
    # prompt (9 tokens) has its 6 new tokens: positions 1..14, the last sampled without a further step.
    assert (stats.prefill_tokens, stats.decode_steps, stats.decode_tokens) == (4, 13, 52)
    assert stats.new_tokens == sum(len(ids) for ids in new_ids) == 24
    assert stats.prefill_seconds > 0 and stats.decode_seconds > 0
    assert "tokens/s" in stats.summary()


def test_torch_compiled_decode_step_gives_the_same_tokens(model, monkeypatch):
    """The torch.compile step: CUDA's compiled path, and a CPU's where the ahead-of-time step is not
    available (tests/test_decode_compiled.py tests that one)."""
    real_compile = torch.compile
    calls = []

    def compile_eagerly(function, **options):  # dynamo traces, but no C++ compiler runs: fast on a CPU
        calls.append(options)
        return real_compile(function, backend="eager")

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    monkeypatch.setattr(aot_step, "aot_compile_available", lambda: False)  # as on torch < 2.8
    steps._compiled_step.cache_clear()
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = generate(model, PROMPTS[:2], 12, temperature=0, compile=True)
    finally:
        steps._compiled_step.cache_clear()
    assert compiled == generate(model, PROMPTS[:2], 12, temperature=0)
    # No mode: "reduce-overhead" (CUDA graphs) only on CUDA; on a CPU the matrix-vector rewrite.
    assert calls == [{"options": {"post_grad_custom_pre_pass": aot_step.matvec_pass()}}]
    # Static shapes: the position is a tensor, so the 11 decode steps share one compiled graph.
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize(
    "prompts, options, message",
    [
        ([[1, 2], []], {}, r"prompts\[1\] is empty: start every prompt with the tokenizer's bos_id"),
        ([[1, 256]], {}, r"prompts\[0\] has token id 256, outside the vocabulary 0..255"),
        ([[1] * 60], {}, r"prompts\[0\] has 60 tokens and max_new_tokens is 5: 65 positions do not fit"),
        ([[1]], {"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ([[1]], {"top_k": 0}, "top_k must be an integer >= 1"),
        ([[1]], {"temperature": -1.0}, "temperature must be >= 0"),
        ([[1]], {"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
        ([[1], [1]], {"seed": [1, 2, 3]}, "got 3 seeds for 2 prompts"),
        ([[1]], {"seed": -1}, "seed must be an integer in"),
    ],
)
def test_bad_requests_are_clear_errors_before_any_work(model, prompts, options, message):
    with pytest.raises(GenerationError, match=message):
        iter_new_tokens(model, prompts, 5, **options)  # raised at the call, not at the first next()


def test_keyword_settings_go_to_the_config_that_declares_them(model):
    sampling, options = resolve_settings(
        None, None, dict(temperature=0.5, seed=3, compile=True, cuda_graphs=False)
    )
    assert (sampling, options) == (
        SamplingConfig(temperature=0.5, seed=3),
        DecodeOptions(compile=True, cuda_graphs=False),
    )
    given = resolve_settings(SamplingConfig(top_k=5), DecodeOptions(compile_cache="x"), dict(top_p=0.5))
    assert given == (SamplingConfig(top_k=5, top_p=0.5), DecodeOptions(compile_cache="x"))
    with pytest.raises(TypeError, match="temprature"):
        generate(model, PROMPTS, 1, temprature=0.5)


# ------------------------------------------------------------------------------------- fitting the context


def test_fit_to_context_caps_max_new_tokens_with_a_warning():
    prompts, max_new_tokens, notes = fit_to_context([[1, 5, 6], [1, 5]], 100, context=10)
    assert (prompts, max_new_tokens) == ([[1, 5, 6], [1, 5]], 7)
    assert notes == [
        "--max-new-tokens 100 does not fit the model's context of 10 after a prompt of 3 tokens: capped to 7"
    ]
    assert fit_to_context([[1]], 100, context=10)[1:] == (
        9,
        [
            "--max-new-tokens 100 does not fit the model's context of 10 after a prompt of 1 tokens: capped to 9"
        ],
    )
    assert fit_to_context([[1, 2]], 8, context=10) == ([[1, 2]], 8, [])


def test_fit_to_context_rejects_a_prompt_longer_than_the_context():
    with pytest.raises(
        GenerationError, match="prompt 2 has 12 tokens .* context is 10 positions.*--truncate"
    ):
        fit_to_context([[1, 2], [1] + list(range(3, 14))], 4, context=10)


def test_fit_to_context_truncates_to_bos_and_the_last_tokens():
    prompt = [1] + list(range(10, 30))  # 21 tokens
    prompts, max_new_tokens, notes = fit_to_context([prompt, [1, 4]], 4, context=10, truncate=True, bos_id=1)
    assert prompts == [[1, 25, 26, 27, 28, 29], [1, 4]]  # 6 tokens + 4 new = the context of 10
    assert max_new_tokens == 4
    assert notes == [
        "prompt 1 has 21 tokens: kept its last 5 after BOS to leave room for 4 new tokens in the context of 10"
    ]


# ------------------------------------------------------------------------------------- streaming text

SCRIPT_TEXT = " café 𝄞 and\tthe king\n"  # 𝄞 (U+1D11E) is not in the corpus: four byte pieces


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    rng = random.Random(0)
    words = ["the", "king", "queen", "café", "and", "of", "my", "lord", "thee", "東京"]
    lines = [" ".join(rng.choice(words) for _ in range(10)) for _ in range(300)]
    return train_tokenizer(["\n".join(lines) + "\n"], tmp_path_factory.mktemp("tok") / "tokenizer.model", 300)


def scripted_next_token_logits(script: list[int], prompt_len: int):
    """decode.next_token_logits with a large bonus on the scripted id at each position, so that the
    greedy continuation of a prompt of `prompt_len` tokens is `script`: lets a test choose what a real
    model (cache and all) generates."""
    real = decode.next_token_logits

    def scripted(model, tokens, start_pos):
        logits = real(model, tokens, start_pos)  # (B, V): scores for position start_pos + T
        index = start_pos + tokens.shape[1] - prompt_len  # that position's place in the script
        if 0 <= index < len(script):
            logits[:, script[index]] += 1000.0
        return logits

    return scripted


def test_stream_yields_whole_characters_and_keeps_the_leading_space(tokenizer, monkeypatch):
    prompt_ids = tokenizer.encode("the queen", bos=True)
    whole = tokenizer.encode("the queen" + SCRIPT_TEXT)
    assert whole[: len(prompt_ids) - 1] == prompt_ids[1:]  # the prompt's pieces do not merge into the rest
    script = whole[len(prompt_ids) - 1 :]  # the continuation's ids, which the model will generate
    byte_pieces = [tokenizer.id_to_piece(i) for i in script if tokenizer.id_to_piece(i).startswith("<0x")]
    assert byte_pieces == ["<0xF0>", "<0x9D>", "<0x84>", "<0x9E>", "<0x09>"]  # 𝄞 in bytes (and the tab)

    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", vocab_size=tokenizer.vocab_size)).eval()
    monkeypatch.setattr(decode, "next_token_logits", scripted_next_token_logits(script, len(prompt_ids)))
    monkeypatch.setattr(decode, "eager_step", lambda model: None)  # every step through next_token_logits
    pieces = list(stream(model, tokenizer, "the queen", len(script), temperature=0, eos_id=-1))
    assert "".join(pieces) == SCRIPT_TEXT == decode_continuation(tokenizer, prompt_ids, script)
    assert pieces[0].startswith(" ")  # decode(script) alone would drop this space
    assert "𝄞" in pieces and not any("\ufffd" in piece for piece in pieces)  # 4 bytes in, 1 whole piece out
    assert len(pieces) >= len(script) - 3  # text came out as it was generated, not all at the end


def test_streamed_pieces_concatenate_to_the_decoded_sample(tokenizer):
    # A random model samples random ids, byte pieces (most of this small vocabulary) included.
    model = tiny_model(seed=3, vocab_size=tokenizer.vocab_size)
    prompt_ids = tokenizer.encode("the king", bos=True)
    new_ids = generate(model, [prompt_ids], 40, temperature=1.0, seed=[5], eos_id=tokenizer.eos_id)[0]
    pieces = list(stream(model, tokenizer, "the king", 40, temperature=1.0, seed=[5]))
    assert "".join(pieces) == decode_continuation(tokenizer, prompt_ids, new_ids)
    assert "the king" + "".join(pieces) == tokenizer.decode(prompt_ids + new_ids)
    assert len(new_ids) > 10
