"""Text <-> token ids, as in LLaMA: training a tokenizer, loading one, decoding as ids arrive, chat formats.

training              train_tokenizer: a SentencePiece BPE tokenizer.model with LLaMA's settings
core                  Tokenizer: a tokenizer.model (sentencepiece) or tokenizer.json (Hugging Face
                      tokenizers, e.g. Llama 3's byte-level BPE) behind one interface; StreamDecoder
sentencepiece_model   a tokenizer.model read without protobuf and converted to an exact tokenizer.json
chat                  chat templates: a conversation's text, token ids and assistant loss mask
"""

from llama_mini.tokenizer.chat import (
    DEFAULT_CHAT_TEMPLATE,
    ChatEncoding,
    chat_stop_ids,
    chat_template_for,
    check_messages,
    encode_chat,
    render_chat,
)
from llama_mini.tokenizer.core import StreamDecoder, Tokenizer, find_tokenizer_file, is_sentencepiece_model
from llama_mini.tokenizer.training import (
    DEFAULT_VOCAB_SIZE,
    MAX_TRAINING_CHARACTERS,
    train_tokenizer,
)

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "DEFAULT_VOCAB_SIZE",
    "MAX_TRAINING_CHARACTERS",
    "ChatEncoding",
    "StreamDecoder",
    "Tokenizer",
    "chat_stop_ids",
    "chat_template_for",
    "check_messages",
    "encode_chat",
    "find_tokenizer_file",
    "is_sentencepiece_model",
    "render_chat",
    "train_tokenizer",
]
