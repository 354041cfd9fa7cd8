"""generate.py --chat on a tiny random checkpoint, stdin driven: each line is a user message answered from the
conversation rendered with the checkpoint's chat template, stopping at its end-of-turn token; the history,
the system message, the context limit and bad flags behave as documented."""

import io
import json

import pytest
import torch
from test_chat_sft import CHATML_TEMPLATE, byte_level_bpe, contents, conversations

from llama_mini.checkpoint import load_model, save_pretrained
from llama_mini.generation import command, decode_continuation, generate
from llama_mini.generation.sampling import row_seed
from llama_mini.model.presets import get_preset
from llama_mini.model.transformer import Transformer
from llama_mini.tokenizer import Tokenizer, chat_stop_ids, encode_chat, train_tokenizer

CONTEXT = 64  # the tiny preset's max_seq_len
QUESTION = "Tell me about the sea."


def save_random_model(folder, tokenizer_path) -> None:
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", vocab_size=Tokenizer(tokenizer_path).vocab_size))
    save_pretrained(model, folder, tokenizer_path=tokenizer_path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random tiny model whose tokenizer.json has the ChatML template (end of turn <|im_end|>, eos </s>)."""
    folder = tmp_path_factory.mktemp("chat_checkpoint")
    byte_level_bpe(contents(conversations(40))).save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHATML_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    save_random_model(folder / "model", folder / "tokenizer.json")
    return folder / "model"


@pytest.fixture(scope="module")
def library(checkpoint):
    return load_model(checkpoint), Tokenizer(checkpoint)


class Recorder:
    """Wraps command.generate: records each call's prompts and sampling, and what generate returned."""

    def __init__(self):
        self.calls, self.results = [], []

    def __call__(self, model, prompts, max_new_tokens, sampling=None, **options):
        self.calls.append((prompts, max_new_tokens, sampling))
        self.results.append(generate(model, prompts, max_new_tokens, sampling, **options))
        return self.results[-1]


@pytest.fixture
def recorder(monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(command, "generate", recorder)
    return recorder


def chat(capsys, monkeypatch, checkpoint, lines: list[str], *flags) -> tuple[int, str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(line + "\n" for line in lines)))
    code = command.main(["--checkpoint", str(checkpoint), "--chat", "--temperature", "0", *map(str, flags)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def test_the_reply_is_the_librarys_greedy_reply_to_the_rendered_prompt(
    checkpoint, library, capsys, monkeypatch
):
    model, tokenizer = library
    code, out, _ = chat(capsys, monkeypatch, checkpoint, [QUESTION], "--max-new-tokens", 12)
    prompt = encode_chat(tokenizer, [user(QUESTION)], add_generation_prompt=True).ids
    new = generate(model, [prompt], 12, temperature=0.0, eos_id=chat_stop_ids(tokenizer))[0]
    assert code == 0
    assert out == decode_continuation(tokenizer, prompt, new).lstrip() + "\n"


def test_replies_stop_at_the_templates_end_of_turn_token_then_at_eos(
    checkpoint, library, recorder, capsys, monkeypatch
):
    _, tokenizer = library
    chat(capsys, monkeypatch, checkpoint, [QUESTION])
    (_, _, sampling), *_ = recorder.calls
    assert sampling.eos_id == (tokenizer.special_tokens["<|im_end|>"], tokenizer.eos_id)


def test_the_second_prompt_holds_the_first_exchange(checkpoint, library, recorder, capsys, monkeypatch):
    _, tokenizer = library
    code, out, err = chat(capsys, monkeypatch, checkpoint, ["Sea?", "And?"], "--max-new-tokens", 4)
    first_reply = decode_continuation(tokenizer, recorder.calls[0][0][0], recorder.results[0][0]).strip()
    history = [user("Sea?"), {"role": "assistant", "content": first_reply}, user("And?")]
    assert code == 0 and len(recorder.calls) == 2 and "dropped" not in err
    assert recorder.calls[1][0] == [encode_chat(tokenizer, history, add_generation_prompt=True).ids]


def test_system_opens_the_conversation(checkpoint, library, recorder, capsys, monkeypatch):
    _, tokenizer = library
    chat(capsys, monkeypatch, checkpoint, [QUESTION], "--system", "Be brief.", "--max-new-tokens", 4)
    messages = [{"role": "system", "content": "Be brief."}, user(QUESTION)]
    assert recorder.calls[0][0] == [encode_chat(tokenizer, messages, add_generation_prompt=True).ids]


def test_each_reply_samples_with_the_seed_of_its_number(checkpoint, recorder, capsys, monkeypatch):
    flags = ["--seed", 5, "--temperature", 0.8, "--max-new-tokens", 3]
    chat(capsys, monkeypatch, checkpoint, ["Hi.", "Bye."], *flags)
    assert [sampling.seed for _, _, sampling in recorder.calls] == [(row_seed(5, 0),), (row_seed(5, 1),)]


def test_the_oldest_exchange_is_dropped_when_the_conversation_outgrows_the_context(
    checkpoint, library, recorder, capsys, monkeypatch
):
    _, tokenizer = library
    long = "Tell me about the sea and the sky and the king."
    code, out, err = chat(capsys, monkeypatch, checkpoint, [long, QUESTION], "--max-new-tokens", 20)
    assert code == 0 and len(encode_chat(tokenizer, [user(long)], True).ids) + 20 <= CONTEXT
    assert "note: dropped the oldest 2 messages of the conversation to fit the context of 64 tokens" in err
    assert recorder.calls[1][0] == [encode_chat(tokenizer, [user(QUESTION)], add_generation_prompt=True).ids]


def test_a_message_longer_than_the_context_fails_that_turn_only(checkpoint, recorder, capsys, monkeypatch):
    code, out, err = chat(capsys, monkeypatch, checkpoint, ["sea " * 80, QUESTION], "--max-new-tokens", 4)
    assert code == 0 and len(recorder.calls) == 1  # the second message is answered
    assert "error: the conversation's last message needs" in err and "context is 64" in err


def test_a_checkpoint_without_a_template_is_prompted_with_the_default(
    tmp_path, recorder, capsys, monkeypatch
):
    words = " ".join(message["content"] for message in conversations(30)[0])
    path = tmp_path / "tokenizer.model"
    train_tokenizer([words * 20], path, vocab_size=300)
    save_random_model(tmp_path / "model", path)
    tokenizer = Tokenizer(tmp_path / "model")
    code, _, err = chat(capsys, monkeypatch, tmp_path / "model", [QUESTION], "--max-new-tokens", 4)
    assert code == 0 and tokenizer.chat_template is None
    assert "has no chat template: using llama_mini's default" in err
    assert recorder.calls[0][0] == [encode_chat(tokenizer, [user(QUESTION)], add_generation_prompt=True).ids]
    assert recorder.calls[0][2].eos_id == (tokenizer.eos_id,)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--chat", "--prompt", "Hi"], "--chat reads the user's messages from stdin, one per line"),
        (["--chat", "--num-samples", "2"], "--chat continues the conversation from one reply"),
        (["--system", "Be brief."], "--system opens a conversation: pass it with --chat"),
    ],
)
def test_flags_that_do_not_go_with_chat_are_one_line_errors(checkpoint, capsys, flags, message):
    code = command.main(["--checkpoint", str(checkpoint), *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_a_streamed_reply_prints_the_same_text(checkpoint, capsys, monkeypatch):
    lines = [QUESTION, "And?"]
    _, printed, _ = chat(capsys, monkeypatch, checkpoint, lines, "--max-new-tokens", 6, "--no-stream")
    _, streamed, _ = chat(capsys, monkeypatch, checkpoint, lines, "--max-new-tokens", 6, "--stream")
    assert streamed == printed and printed.strip()
