"""Chat templates render as transformers renders them, and the loss mask covers exactly the assistant turns."""

import json

import pytest
from test_tokenizer import VOCAB_SIZE, synthetic_corpus
from test_tokenizer_hf import chatml_folder, llama3_folder  # noqa: F401 (module-scoped fixtures)

from llama_mini.errors import DataError
from llama_mini.tokenizer import (
    DEFAULT_CHAT_TEMPLATE,
    Tokenizer,
    chat_stop_ids,
    encode_chat,
    render_chat,
    train_tokenizer,
)
from llama_mini.tokenizer.chat import chat_template_for, check_messages

transformers = pytest.importorskip("transformers")

# Llama 3's chat format: a header per turn, <|eot_id|> after each message, the system message first.
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = '' %}
{%- endif %}
{%- if system_message %}
    {{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system_message + '<|eot_id|>' }}
{%- endif %}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception('Only user and assistant roles follow the system message, got ' + message['role']) }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# ChatML as SmolLM writes it: a default system message when the chat has none; "\n" after each <|im_end|>.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The same written over several lines: trim_blocks drops the newline after a {% tag %} but not after a
# {{ value }}, so each message gets a second "\n", and the generation prompt one that the reply lacks.
CHATML_TEMPLATE_WITH_STRAY_NEWLINES = """{% for message in messages %}
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}
{% endfor %}
{% if add_generation_prompt %}
{{ '<|im_start|>assistant\\n' }}
{% endif %}"""

CHAT = [
    {"role": "system", "content": "Answer as the king would."},
    {"role": "user", "content": "Who is the queen?"},
    {"role": "assistant", "content": "My lord, the queen of 東京 🙂"},
    {"role": "user", "content": "And thou?"},
    {"role": "assistant", "content": "the king, 12 years."},
]


def with_template(folder, template) -> str:
    """Put `template` into the folder's tokenizer_config.json; return the folder."""
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return folder


@pytest.fixture(scope="module")
def llama3_chat(llama3_folder):  # noqa: F811
    return with_template(llama3_folder, LLAMA3_TEMPLATE)


@pytest.fixture(scope="module")
def chatml_chat(chatml_folder):  # noqa: F811
    return with_template(chatml_folder, CHATML_TEMPLATE)


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """Our sentencepiece tokenizer, saved as a checkpoint's files (no chat template: the default applies)."""
    folder = tmp_path_factory.mktemp("ours")
    train_tokenizer(synthetic_corpus(), folder / "source" / "tokenizer.model", VOCAB_SIZE).save_pretrained(
        folder
    )
    return folder


def masked_runs(encoding) -> list[list[int]]:
    """The ids of each maximal run of True in the mask."""
    runs, current = [], []
    for token_id, masked in zip(encoding.ids, encoding.mask, strict=True):
        if masked:
            current.append(token_id)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


# ---------------------------------------------------------------------------------------------------------
# Rendering equals transformers'
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("folder_name", ["llama3_chat", "chatml_chat"])
@pytest.mark.parametrize("messages", [CHAT, CHAT[1:], CHAT[:2]])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_rendered_text_equals_transformers(request, folder_name, messages, add_generation_prompt):
    folder = request.getfixturevalue(folder_name)
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    expected = reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert render_chat(Tokenizer(folder), messages, add_generation_prompt) == expected


@pytest.mark.parametrize("folder_name", ["llama3_chat", "chatml_chat"])
def test_chat_ids_equal_transformers_tokenized_template(request, folder_name):
    folder = request.getfixturevalue(folder_name)
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    expected = reference.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    assert encode_chat(Tokenizer(folder), CHAT).ids == expected


def test_default_template_renders_and_tokenizes_as_transformers_does(ours):
    reference = transformers.AutoTokenizer.from_pretrained(ours)
    tokenizer = Tokenizer(ours)
    assert tokenizer.chat_template is None
    text = reference.apply_chat_template(CHAT, chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=False)
    assert render_chat(tokenizer, CHAT) == text
    assert encode_chat(tokenizer, CHAT).ids == reference(text, add_special_tokens=False).input_ids


def test_default_template_writes_roles_as_words_and_ends_replies_with_eos(ours):
    text = render_chat(Tokenizer(ours), CHAT[:3], add_generation_prompt=False)
    assert text == (
        "<s>system: Answer as the king would.\n"
        "user: Who is the queen?\n"
        "assistant: My lord, the queen of 東京 🙂</s>"
    )
    assert render_chat(Tokenizer(ours), CHAT[:2], add_generation_prompt=True).endswith("queen?\nassistant:")


def test_environment_has_transformers_filters_and_tags(chatml_chat, tmp_path):
    """tojson keeps non-ASCII text, {% generation %} renders its body, loop controls work."""
    template = (
        "{% for message in messages %}{% if message['role'] == 'system' %}{% continue %}{% endif %}"
        "{% generation %}{{ message | tojson }}{% endgeneration %}\n{% endfor %}"
    )
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ["tokenizer.json", "tokenizer_config.json"]:
        (folder / name).write_text((chatml_chat / name).read_text())
    with_template(folder, template)
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    expected = reference.apply_chat_template(CHAT, tokenize=False)
    assert render_chat(Tokenizer(folder), CHAT) == expected
    assert "東京 🙂" in expected and "\\u" not in expected  # not escaped, as Jinja's own tojson would


# ---------------------------------------------------------------------------------------------------------
# The loss mask
# ---------------------------------------------------------------------------------------------------------


def test_llama3_mask_covers_each_reply_and_its_eot(llama3_chat):
    tokenizer = Tokenizer(llama3_chat)
    encoding = encode_chat(tokenizer, CHAT)
    eot = tokenizer.special_tokens["<|eot_id|>"]
    assert len(encoding.mask) == len(encoding.ids)
    assert masked_runs(encoding) == [
        [*tokenizer.encode("My lord, the queen of 東京 🙂"), eot],
        [*tokenizer.encode("the king, 12 years."), eot],
    ]


def test_chatml_mask_stops_at_im_end_not_at_the_newline_after_it(chatml_chat):
    tokenizer = Tokenizer(chatml_chat)
    encoding = encode_chat(tokenizer, CHAT)
    im_end = tokenizer.special_tokens["<|im_end|>"]
    assert masked_runs(encoding) == [
        [*tokenizer.encode("My lord, the queen of 東京 🙂"), im_end],
        [*tokenizer.encode("the king, 12 years."), im_end],
    ]
    assert encoding.ids[-1] == tokenizer.encode("\n")[0] and encoding.mask[-1] is False


def test_default_template_mask_covers_reply_and_eos_on_sentencepiece(ours):
    tokenizer = Tokenizer(ours)
    encoding = encode_chat(tokenizer, CHAT)
    # The reply's leading space is sentencepiece's "▁" on its first word: the ids of the reply alone.
    assert masked_runs(encoding) == [
        [*tokenizer.encode("My lord, the queen of 東京 🙂"), tokenizer.eos_id],
        [*tokenizer.encode("the king, 12 years."), tokenizer.eos_id],
    ]


@pytest.mark.parametrize("folder_name", ["llama3_chat", "chatml_chat", "ours"])
def test_the_generation_prompt_is_the_prefix_the_reply_is_trained_after(request, folder_name):
    tokenizer = Tokenizer(request.getfixturevalue(folder_name))
    encoding = encode_chat(tokenizer, CHAT)
    reply_starts = [
        i for i, masked in enumerate(encoding.mask) if masked and (i == 0 or not encoding.mask[i - 1])
    ]
    prompts = [encode_chat(tokenizer, CHAT[:2], True), encode_chat(tokenizer, CHAT[:4], True)]
    assert [prompt.ids for prompt in prompts] == [encoding.ids[:start] for start in reply_starts]
    assert not any(prompts[0].mask)


def test_stop_ids_are_the_end_of_turn_token_then_the_eos_ids(llama3_chat, chatml_chat, ours):
    llama3 = Tokenizer(llama3_chat)
    assert chat_stop_ids(llama3) == tuple(
        llama3.special_tokens[token] for token in ["<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"]
    )
    chatml = Tokenizer(chatml_chat)
    assert chat_stop_ids(chatml) == (chatml.special_tokens["<|im_end|>"],)
    assert chat_stop_ids(Tokenizer(ours)) == (2,)


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], r"a chat needs at least one message"),
        ("hello", r"a chat is a list of \{'role', 'content'\} messages, not a str"),
        ([("user", "hi")], r"chat message 0 is a tuple, not a dict"),
        ([{"role": "robot", "content": "hi"}], r"chat message 0 has role 'robot': use one of system, user"),
        ([{"role": "user", "content": None}], r"chat message 0's content is a NoneType, not a string"),
        ([{"role": "user", "content": ["hi"]}], r"chat message 0's content is a list, not a string"),
        ([{"role": "user", "content": "hi</s>"}], r"contains the special token '</s>'"),
    ],
)
def test_bad_messages_are_one_line_data_errors(ours, messages, message):
    with pytest.raises(DataError, match=message) as error:
        encode_chat(Tokenizer(ours), messages)
    assert "\n" not in str(error.value)


def test_raise_exception_in_the_template_is_a_data_error(llama3_chat):
    bad = [CHAT[0], {"role": "tool", "content": "42"}]
    with pytest.raises(DataError, match=r"Only user and assistant roles follow the system message, got tool"):
        render_chat(Tokenizer(llama3_chat), bad)


def test_template_syntax_error_is_a_data_error(tmp_path, ours):
    for name in ["tokenizer.model", "tokenizer_config.json"]:
        (tmp_path / name).write_bytes((ours / name).read_bytes())
    with_template(tmp_path, "{% for message in messages %}")
    with pytest.raises(DataError, match=r"chat template .* failed \(TemplateSyntaxError"):
        render_chat(Tokenizer(tmp_path), CHAT)


def test_a_template_whose_prompt_is_not_a_prefix_of_the_chat_cannot_be_masked(tmp_path, chatml_chat):
    for name in ["tokenizer.json", "tokenizer_config.json"]:
        (tmp_path / name).write_text((chatml_chat / name).read_text())
    tokenizer = Tokenizer(with_template(tmp_path, CHATML_TEMPLATE_WITH_STRAY_NEWLINES))
    assert render_chat(tokenizer, CHAT[1:2], add_generation_prompt=True).endswith("<|im_start|>assistant\n\n")
    with pytest.raises(DataError, match="renders the chat up to message 1 differently from the start"):
        encode_chat(tokenizer, CHAT[1:])


def test_a_template_set_on_the_tokenizer_is_saved_for_transformers(tmp_path, ours, chatml_chat):
    tokenizer = Tokenizer(ours)
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE  # as chat fine-tuning of our model would
    tokenizer.save_pretrained(tmp_path / "ours")
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path / "ours")
    assert reference.apply_chat_template(CHAT, tokenize=False) == render_chat(tokenizer, CHAT)
    chatml = Tokenizer(chatml_chat)
    chatml.chat_template = LLAMA3_TEMPLATE.replace("<|eot_id|>", "<|im_end|>")
    chatml.save_pretrained(tmp_path / "chatml")
    assert Tokenizer(tmp_path / "chatml").chat_template == chatml.chat_template


def test_the_encodings_text_is_the_rendered_chat(llama3_chat):
    tokenizer = Tokenizer(llama3_chat)
    encoding = encode_chat(tokenizer, CHAT)
    assert encoding.text == render_chat(tokenizer, CHAT)
    assert encoding.ids == tokenizer.encode(encoding.text, parse_special=True)


def test_check_messages_finds_a_bad_role_without_a_tokenizer():
    with pytest.raises(DataError, match=r"chat message 1 has role 'robot'"):
        check_messages([CHAT[1], {"role": "robot", "content": "Beep."}])


def test_chat_template_for_is_the_tokenizers_own_else_the_default(llama3_chat, ours):
    assert chat_template_for(Tokenizer(llama3_chat)) == LLAMA3_TEMPLATE
    assert chat_template_for(Tokenizer(ours)) == DEFAULT_CHAT_TEMPLATE
