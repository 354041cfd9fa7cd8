"""Chat fine-tuning: a .jsonl of {"messages": [...]} records is recognised, rendered with the tokenizer's chat
template, stored with its loss mask, drawn as rows that begin a conversation with IGNORE_INDEX off the
assistant tokens, refused in one line when a record is bad; and end to end, a tiny Hugging Face model is
fine-tuned on it, keeps its template, and answers `generate.py --chat` until its end-of-turn token."""

import io
import json
import random
import re

import numpy as np
import pytest
import torch
from data_helpers import write_chat_data

import train as train_cli
from llama_mini.checkpoint import load_model
from llama_mini.data import (
    MANIFEST,
    TokenSplit,
    get_batch,
    open_source,
    prepare_data,
    read_manifest,
)
from llama_mini.data import pool as pool_module
from llama_mini.data.checks import CHECKED
from llama_mini.data.shards import DataWriter
from llama_mini.errors import DataError
from llama_mini.generation import decode_continuation, generate
from llama_mini.generation.command import main as generate_main
from llama_mini.ops.loss import IGNORE_INDEX
from llama_mini.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer, encode_chat, render_chat
from llama_mini.train import TrainConfig, Trainer
from llama_mini.train.run_folder import METRICS

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

# ChatML, as SmolLM and Qwen write it; <|im_end|> ends a turn, and the tokenizer's eos is another token.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
ANSWERS = {"sky": "Blue.", "sea": "Salt.", "king": "Henry.", "rose": "Red."}
TINY_LLAMA = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def conversations(count: int, seed: int = 0) -> list[list[dict]]:
    """Questions about four topics, each answered always the same way: something a tiny model can learn.
    Every fifth has a system message, every seventh a second exchange."""
    rng = random.Random(seed)
    chats = []
    for number in range(count):
        topic = rng.choice(list(ANSWERS))
        chat = [
            {"role": "user", "content": f"Tell me {number} about the {topic}."},
            {"role": "assistant", "content": ANSWERS[topic]},
        ]
        if number % 5 == 0:
            chat.insert(0, {"role": "system", "content": "Be brief."})
        if number % 7 == 0:
            chat += [{"role": "user", "content": "And?"}, {"role": "assistant", "content": "No more."}]
        chats.append(chat)
    return chats


def byte_level_bpe(texts: list[str]):
    """A byte-level BPE with <s>, </s> and ChatML's control tokens, as a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def contents(chats: list[list[dict]]) -> list[str]:
    return [message["content"] for chat in chats for message in chat] * 3


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


def set_template(folder, template) -> None:
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    """A tokenizer.json whose tokenizer_config.json holds the ChatML template (eos </s>, end of turn
    <|im_end|>)."""
    folder = tmp_path_factory.mktemp("chatml")
    byte_level_bpe(contents(conversations(40))).save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML_TEMPLATE}))
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("chats")
    return write_jsonl(
        folder / "chats.jsonl", [{"messages": chat, "id": n} for n, chat in enumerate(conversations(40))]
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, chatml, corpus):
    """The corpus prepared with the ChatML tokenizer: (train, val)."""
    return prepare_data(corpus, tmp_path_factory.mktemp("prepared"), Tokenizer(chatml), 0.2, seed=3)


def conversation_tokens(split: TokenSplit, number: int) -> tuple[list[int], list[bool]]:
    """The stored ids and mask of conversation `number` of a prepared chat split."""
    start, length = int(split.chat.starts[number]), int(split.chat.lengths[number])
    masks = split.chat.mask_windows(np.array([start]), length)[0]
    return split.read(start, start + length).tolist(), masks.tolist()


# ---------------------------------------------------------------------------------------------------------
# Recognising a chat corpus
# ---------------------------------------------------------------------------------------------------------


def test_a_jsonl_whose_records_have_messages_is_read_as_conversations(corpus):
    source = open_source(corpus)
    first = next(iter(source.documents()))
    assert source.chat is True
    assert json.loads(first) == conversations(1)[0]


def test_no_chat_reads_the_text_field_of_the_same_records(tmp_path):
    path = write_jsonl(tmp_path / "both.jsonl", [{"messages": conversations(1)[0], "text": "plain words"}])
    source = open_source(path, chat=False)
    assert source.chat is False and list(source.documents()) == ["plain words"]


def test_a_conversation_is_the_same_document_whatever_its_key_order(tmp_path):
    chat = conversations(1)[0]
    reordered = [{"content": message["content"], "role": message["role"]} for message in chat]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": chat}, {"messages": reordered}])
    first, second = open_source(path).documents()
    assert first == second  # so both land in the same split, however they were written


def test_chat_on_a_corpus_that_is_not_jsonl_is_a_one_line_error(tmp_path):
    (tmp_path / "book.txt").write_text("Once upon a time.\n")
    with pytest.raises(DataError, match=r"--chat reads conversations from \.jsonl files") as error:
        open_source(str(tmp_path / "book.txt"), chat=True)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------------------
# Prepared chat data
# ---------------------------------------------------------------------------------------------------------


def test_stored_ids_and_masks_are_encode_chats(tmp_path, chatml):
    tokenizer = Tokenizer(chatml)
    chats = conversations(12)
    train, _ = write_chat_data(tmp_path, {"train": chats[:9], "val": chats[9:]}, tokenizer, shard_tokens=50)
    stored = [conversation_tokens(train, number) for number in range(len(train.chat))]
    expected = [encode_chat(tokenizer, chat) for chat in chats[:9]]
    assert stored == [(encoding.ids, encoding.mask) for encoding in expected]


def test_the_manifest_records_chat_data_and_their_template(prepared, chatml):
    manifest = read_manifest(prepared[0].folder)
    assert manifest["chat"]["template"] == CHATML_TEMPLATE and manifest["chat"]["default_template"] is False
    assert manifest["provenance"]["settings"]["chat"] is True
    assert prepared[0].chat.template == CHATML_TEMPLATE


def test_every_conversation_is_in_one_split_whole(prepared, chatml, corpus):
    tokenizer = Tokenizer(chatml)
    stored = sorted(
        ids
        for split in prepared
        for ids, _ in map(lambda n: conversation_tokens(split, n), range(len(split.chat)))
    )
    assert stored == sorted(encode_chat(tokenizer, chat).ids for chat in conversations(40))


def test_assistant_token_counts_are_recorded_for_bits_per_byte(prepared):
    train = prepared[0]
    masks = train.chat.mask_windows(np.array([0]), len(train))[0]
    assert train.meta.target_tokens == int(masks.sum()) > 0
    assert train.meta.loss_tokens_per_byte == train.meta.target_tokens / train.meta.target_bytes


def test_data_prepared_with_another_template_are_prepared_again(tmp_path, chatml, corpus):
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_text((chatml / name).read_text())
    lines = []
    prepare_data(corpus, tmp_path / "data", Tokenizer(folder), 0.2, log=lines.append)
    prepare_data(corpus, tmp_path / "data", Tokenizer(folder), 0.2, log=lines.append)
    set_template(folder, CHATML_TEMPLATE.replace("<|im_start|>", "<s>"))
    prepare_data(corpus, tmp_path / "data", Tokenizer(folder), 0.2, log=lines.append)
    assert [line.split()[1] for line in lines if line.split()[1] in ("tokenizing", "reusing")] == [
        "tokenizing",
        "reusing",
        "tokenizing",
    ]
    assert read_manifest(tmp_path / "data")["chat"]["template"].startswith(
        "{% for message in messages %}{{ '<s>'"
    )


def test_chat_shards_are_identical_for_any_number_of_workers(monkeypatch, tmp_path, chatml, corpus):
    monkeypatch.setattr(pool_module, "PARALLEL_MIN_BYTES", 0)  # start the workers even for a tiny corpus
    monkeypatch.setattr(pool_module, "BATCH_CHARACTERS", 2000)
    for workers in (1, 2):
        prepare_data(corpus, tmp_path / f"w{workers}", Tokenizer(chatml), 0.2, workers=workers)
    names = sorted(path.name for path in (tmp_path / "w1").iterdir() if path.name not in (MANIFEST, CHECKED))
    assert any("-masks-" in name for name in names) and any("-conversations-" in name for name in names)
    assert all(
        (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes() for name in names
    )


def test_chat_preparation_stopped_by_ctrl_c_goes_on_to_the_same_bytes(monkeypatch, tmp_path, chatml, corpus):
    monkeypatch.setattr(pool_module, "BATCH_CHARACTERS", 300)
    checkpoint, calls = DataWriter.checkpoint, []

    def counted(self, position):
        calls.append(position["next"])
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        checkpoint(self, position)

    monkeypatch.setattr(DataWriter, "checkpoint", counted)
    stop_at = 0  # (never)
    prepare_data(corpus, tmp_path / "whole", Tokenizer(chatml), 0.2, shard_tokens=200)
    stop_at, batches = len(calls) // 2 + len(calls), len(calls)  # in the middle of the next preparation
    with pytest.raises(KeyboardInterrupt):
        prepare_data(corpus, tmp_path / "out", Tokenizer(chatml), 0.2, shard_tokens=200)
    lines = []
    prepare_data(corpus, tmp_path / "out", Tokenizer(chatml), 0.2, shard_tokens=200, log=lines.append)
    assert lines[1].startswith(f"data: going on with the interrupted preparation of {tmp_path / 'out'} from ")
    assert len(calls) == 2 * batches + 1  # the resumed run tokenized only the batches not yet written
    files = {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir() if path.name != CHECKED}
    whole = {path.name: path.read_bytes() for path in (tmp_path / "whole").iterdir() if path.name != CHECKED}
    assert any("-conversations-" in name for name in files) and files.keys() == whole.keys()
    for name in files:
        if name == MANIFEST:  # equal but for the time of writing
            files[name], whole[name] = (
                {**json.loads(m), "provenance": {**json.loads(m)["provenance"], "prepared": 0}}
                for m in (files[name], whole[name])
            )
        assert files[name] == whole[name], name


# ---------------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------------


def expected_targets(split: TokenSplit, starts: np.ndarray, window: int) -> np.ndarray:
    """The next token where it is an assistant token, else IGNORE_INDEX, read from the whole split."""
    tokens = np.append(split.read(0, len(split)).astype(np.int64), np.zeros(window, np.int64))
    masks = np.append(split.chat.mask_windows(np.array([0]), len(split))[0], np.zeros(window, bool))
    rows = starts[:, None] + np.arange(1, window)
    return np.where(masks[rows], tokens[rows], IGNORE_INDEX)


def _rows(split: TokenSplit, seq_len: int) -> np.ndarray:
    """The first seq_len tokens of a row from each conversation of `split`, padded with 0."""
    return split.windows(split.chat.starts, seq_len, fill=0).astype(np.int64)


def test_every_row_starts_at_a_conversation_start(prepared):
    train = prepared[0]
    x, _ = get_batch(train, 16, 48, step=0, seed=1)
    firsts = {tuple(row) for row in _rows(train, 48).tolist()}
    assert all(tuple(row) in firsts for row in x.tolist())


def test_targets_are_the_next_token_on_assistant_tokens_and_ignore_index_elsewhere(prepared):
    train = prepared[0]
    x, y = get_batch(train, 16, 48, step=2, seed=1)
    starts = np.array([int(np.flatnonzero(np.all(_rows(train, 48) == row, axis=1))[0]) for row in x.numpy()])
    assert torch.equal(y, torch.from_numpy(expected_targets(train, train.chat.starts[starts], 49)))


def test_a_rows_targets_are_its_reply_and_the_end_of_turn_token(tmp_path, chatml):
    tokenizer = Tokenizer(chatml)
    chat = [{"role": "user", "content": "Tell me about the sea."}, {"role": "assistant", "content": "Salt."}]
    train, _ = write_chat_data(tmp_path, {"train": [chat], "val": [chat]}, tokenizer)
    _, y = get_batch(train, 1, 40, step=0, seed=0)
    targets = [token for token in y[0].tolist() if token != IGNORE_INDEX]
    assert targets == [*tokenizer.encode("Salt."), tokenizer.special_tokens["<|im_end|>"]]


def test_chat_batches_are_a_pure_function_of_seed_and_step(prepared):
    train = prepared[0]
    first, again = get_batch(train, 8, 48, step=5, seed=7), get_batch(train, 8, 48, step=5, seed=7)
    other = get_batch(train, 8, 48, step=6, seed=7)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_the_ranks_rows_together_are_the_one_process_batch(prepared):
    train = prepared[0]
    whole = get_batch(train, 8, 48, step=3, seed=7)
    parts = [get_batch(train, 2, 48, step=3, seed=7, rank=rank, world_size=4) for rank in range(4)]
    assert torch.equal(torch.cat([x for x, _ in parts]), whole[0])
    assert torch.equal(torch.cat([y for _, y in parts]), whole[1])


def test_a_row_past_the_splits_end_is_filled_with_ignored_targets(tmp_path, chatml):
    tokenizer = Tokenizer(chatml)
    chat = [{"role": "user", "content": "Sea?"}, {"role": "assistant", "content": "Salt."}]
    train, _ = write_chat_data(tmp_path, {"train": [chat], "val": [chat]}, tokenizer)
    length = len(train)
    x, y = get_batch(train, 1, length + 9, step=0, seed=0)
    assert x[0, length:].tolist() == [0] * 9 and y[0, length - 1 :].tolist() == [IGNORE_INDEX] * 10


def test_conversations_longer_than_the_context_are_counted_and_described(tmp_path, chatml):
    tokenizer = Tokenizer(chatml)
    short = [{"role": "user", "content": "Sea?"}, {"role": "assistant", "content": "Salt."}]
    long = [{"role": "user", "content": "Sea?"}, {"role": "assistant", "content": "Salt. " * 30}]
    train, _ = write_chat_data(tmp_path, {"train": [short, long, long], "val": [short]}, tokenizer)
    seq_len = len(encode_chat(tokenizer, short).ids) + 5
    assert train.chat.longer_than(seq_len) == 2
    assert train.chat.describe(seq_len) == (
        f"chat: 2 of 3 train conversations are longer than the context (rows of max_seq_len + 1 = "
        f"{seq_len + 1} tokens) and are truncated to it"
    )


def test_a_conversation_with_no_assistant_token_in_the_context_never_starts_a_row(tmp_path, chatml):
    tokenizer = Tokenizer(chatml)
    answered = [{"role": "user", "content": "Sea?"}, {"role": "assistant", "content": "Salt."}]
    rambling = [{"role": "user", "content": "Sea? " * 40}, {"role": "assistant", "content": "Salt."}]
    train, _ = write_chat_data(tmp_path, {"train": [rambling, answered], "val": [answered]}, tokenizer)
    ids = encode_chat(tokenizer, answered).ids
    x, _ = get_batch(train, 32, len(ids), step=0, seed=0)
    assert train.chat.untrained(len(ids)) == 1
    assert (x == torch.tensor(ids)).all()  # every row is the answered conversation


def test_a_split_with_nothing_to_train_within_the_context_is_a_one_line_error(tmp_path, chatml):
    tokenizer = Tokenizer(chatml)
    rambling = [{"role": "user", "content": "Sea? " * 40}, {"role": "assistant", "content": "Salt."}]
    train, _ = write_chat_data(tmp_path, {"train": [rambling], "val": [rambling]}, tokenizer)
    with pytest.raises(
        DataError, match=r"no conversation of the train split .* has an assistant token within"
    ):
        get_batch(train, 2, 20, step=0, seed=0)


# ---------------------------------------------------------------------------------------------------------
# Bad input through train.py: one line naming the file and line, exit code 2
# ---------------------------------------------------------------------------------------------------------


def run_train(capsys, *argv) -> tuple[int, str]:
    code = train_cli.main([str(arg) for arg in argv])
    return code, capsys.readouterr().err


def error_line(err: str) -> str:
    """The one line of a refused run: the last on stderr, after the progress lines; no traceback."""
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in err, err
    return last


def tiny_run(data, tokenizer, out, *more) -> list:
    return [
        "--data", data, "--tokenizer", tokenizer, "--out", out, "--device", "cpu", "--max-steps", "1",
        "--batch-size", "2", "--eval-steps", "1", "--sample-tokens", "0", "--dim", "32", "--n-layers", "1",
        "--n-heads", "2", "--multiple-of", "16", "--max-seq-len", "32", *more,
    ]  # fmt: skip


def records_with(bad: dict, at: int = 2) -> list[dict]:
    records = [{"messages": chat} for chat in conversations(20)]
    records.insert(at, bad)
    return records


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"text": "no messages"}, r'line 3 has no "messages" list: each line must be an object like'),
        ({"messages": "hello"}, r'line 3 has a non-list "messages" list'),
        (
            {"messages": [{"role": "robot", "content": "Beep."}]},
            r"line 3: chat message 0 has role 'robot': use one of system, user, assistant, tool",
        ),
        ({"messages": []}, r"line 3: a chat needs at least one message"),
    ],
)
def test_a_bad_record_is_one_line_naming_its_file_and_line(tmp_path, chatml, capsys, bad, message):
    data = write_jsonl(tmp_path / "chats.jsonl", records_with(bad))
    code, err = run_train(capsys, *tiny_run(data, chatml, tmp_path / "run"))
    assert code == 2
    assert re.search(f"{re.escape(data)} {message}", error_line(err)), err


@pytest.mark.parametrize("workers", [1, 2])
def test_a_record_the_template_cannot_take_is_found_by_file_and_line(
    monkeypatch, tmp_path, chatml, capsys, workers
):
    monkeypatch.setattr(pool_module, "PARALLEL_MIN_BYTES", 0)  # the workers find it, by number
    bad = {"messages": [{"role": "user", "content": "Say <|im_end|> now."}]}
    data = write_jsonl(tmp_path / "chats.jsonl", records_with(bad, at=9))
    code, err = run_train(capsys, *tiny_run(data, chatml, tmp_path / "run", "--data-workers", workers))
    assert code == 2
    assert f"{data} line 10: chat message 0's content contains the special token '<|im_end|>'" in error_line(
        err
    )


def test_conversations_longer_than_the_context_are_reported_not_refused(tmp_path, chatml, capsys):
    records = [{"messages": chat} for chat in conversations(20)]
    records[0]["messages"][-1]["content"] = "Blue. " * 20
    data = write_jsonl(tmp_path / "chats.jsonl", records)
    code, err = run_train(capsys, *tiny_run(data, chatml, tmp_path / "run"))
    assert code == 0, err
    assert "train conversations are longer than the context (rows of max_seq_len + 1 = 33 tokens)" in err


def tiny_config(data, tokenizer, out, **settings) -> TrainConfig:
    values = dict(data=str(data), out=str(out), tokenizer=tokenizer, max_steps=6, batch_size=4, lr=3e-3)
    values |= dict(
        warmup_steps=2, eval_interval=3, eval_steps=2, log_interval=1, sample_tokens=0, device="cpu"
    )
    return TrainConfig(**{**values, **settings})


def test_a_resumed_chat_run_equals_an_uninterrupted_one(tmp_path, chatml, corpus):
    model = dict(dim=32, n_layers=1, n_heads=2, multiple_of=16, max_seq_len=48)
    Trainer(tiny_config(corpus, str(chatml), tmp_path / "whole"), model, show_progress=False).run()
    trainer = Trainer(tiny_config(corpus, str(chatml), tmp_path / "broken"), model, show_progress=False)
    original_step = trainer.train_step

    def interrupt_after_step_2(step):
        loss = original_step(step)
        trainer.stop_requested = step == 1
        return loss

    trainer.train_step = interrupt_after_step_2
    assert trainer.run().step == 2
    resumed = Trainer(
        tiny_config(corpus, str(chatml), tmp_path / "broken"), {}, resume=True, show_progress=False
    )
    resumed.run()
    losses = [
        [(r["step"], r["loss"]) for r in map(json.loads, (tmp_path / run / METRICS).read_text().splitlines())
         if r["type"] == "train"]
        for run in ("whole", "broken")
    ]  # fmt: skip
    assert losses[0] == losses[1] and len(losses[0]) == 6  # bit for bit, step for step


def test_a_tokenizer_trained_for_a_chat_run_carries_the_default_template(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    flags = tiny_run(corpus, "unused", run)
    flags = flags[:2] + flags[4:]  # no --tokenizer: one is trained on the conversations
    code, err = run_train(capsys, *flags, "--vocab-size", "300", "--max-seq-len", "96")
    assert code == 0, err
    assert Tokenizer(run / "best").chat_template == DEFAULT_CHAT_TEMPLATE
    assert read_manifest(run / "data")["chat"]["default_template"] is True


# ---------------------------------------------------------------------------------------------------------
# End to end: train.py --init-from a tiny Hugging Face model, then generate.py --chat
# ---------------------------------------------------------------------------------------------------------


def save_tiny_llama(folder, texts: list[str], template: str | None) -> None:
    """A random LlamaForCausalLM and its tokenizer (with `template`), saved by transformers itself."""
    tokenizer = byte_level_bpe(texts)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(), bos_token_id=1, eos_token_id=2, **TINY_LLAMA
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = template
    fast.save_pretrained(folder)


def fine_tune(init_from, data, out, steps: int) -> int:
    return train_cli.main([
        "--init-from", str(init_from), "--data", str(data), "--out", str(out), "--device", "cpu",
        "--max-steps", str(steps), "--batch-size", "8", "--lr", "1e-2", "--warmup-steps", "5",
        "--eval-interval", str(steps), "--eval-steps", "2", "--log-interval", "5", "--sample-tokens", "0",
        "--max-seq-len", "32",
    ])  # fmt: skip


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A tiny Llama with ChatML, fine-tuned for 120 steps on 120 conversations: (run folder, chats)."""
    folder = tmp_path_factory.mktemp("chat_sft")
    chats = conversations(120)
    save_tiny_llama(folder / "hf", contents(chats), CHATML_TEMPLATE)
    data = write_jsonl(folder / "chats.jsonl", [{"messages": chat} for chat in chats])
    assert fine_tune(folder / "hf", data, folder / "run", steps=120) == 0
    return folder / "run", chats


def test_chat_fine_tuning_lowers_the_loss_on_the_assistant_tokens(chat_run):
    losses = [json.loads(line) for line in (chat_run[0] / METRICS).read_text().splitlines()]
    train = [record["loss"] for record in losses if record["type"] == "train"]
    assert train[0] > 1.0 and train[-1] < 0.1 * train[0]


def test_the_checkpoint_carries_the_chat_template(chat_run):
    best = chat_run[0] / "best"
    reference = transformers.AutoTokenizer.from_pretrained(best)
    assert reference.chat_template == CHATML_TEMPLATE == Tokenizer(best).chat_template


def test_generate_chat_answers_in_the_template_and_stops_at_the_end_of_turn(chat_run, capsys, monkeypatch):
    run, _ = chat_run
    questions = ["Tell me 500 about the sea.", "Tell me 501 about the king."]
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(question + "\n" for question in questions)))
    code = generate_main(["--checkpoint", str(run), "--chat", "--temperature", "0", "--max-new-tokens", "8"])
    captured = capsys.readouterr()
    assert code == 0
    assert captured.out == "Salt.\nHenry.\n" and "cut" not in captured.err
    # The library, prompted with the template and not told to stop, writes <|im_end|> right after "Salt.".
    tokenizer, model = Tokenizer(run / "best"), load_model(run / "best")
    prompt = encode_chat(tokenizer, [{"role": "user", "content": questions[0]}], add_generation_prompt=True)
    room = model.args.max_seq_len - len(prompt.ids)
    new = generate(model, [prompt.ids], room, temperature=0.0, eos_id=None)[0]
    end = new.index(tokenizer.special_tokens["<|im_end|>"])
    assert decode_continuation(tokenizer, prompt.ids, new[:end]) == "Salt."
    assert (
        tokenizer.eos_id != tokenizer.special_tokens["<|im_end|>"]
    )  # so eos alone would not have stopped it


def test_a_model_fine_tuned_on_the_default_template_keeps_it(tmp_path):
    chats = conversations(30)
    save_tiny_llama(tmp_path / "hf", contents(chats), template=None)
    data = write_jsonl(tmp_path / "chats.jsonl", [{"messages": chat} for chat in chats])
    assert fine_tune(tmp_path / "hf", data, tmp_path / "run", steps=2) == 0
    best = tmp_path / "run" / "best"
    assert json.loads((best / "tokenizer_config.json").read_text())["chat_template"] == DEFAULT_CHAT_TEMPLATE
    reference = transformers.AutoTokenizer.from_pretrained(best)
    assert reference.apply_chat_template(chats[0], tokenize=False) == render_chat(Tokenizer(best), chats[0])
    assert read_manifest(tmp_path / "run" / "data")["chat"]["default_template"] is True
