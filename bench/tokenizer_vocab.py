"""How the tokenizer's vocabulary size trades compression against rarely seen pieces, on a corpus.

    python bench/tokenizer_vocab.py                          # Shakespeare, vocab 2048 / 4096 / 8192
    python bench/tokenizer_vocab.py --data my_texts/ --vocab-sizes 1024 4096

For each size: a tokenizer trained on the training split (as train.py does), the bytes per token it gives
on the training and validation splits (more is better: fewer positions per text), the pieces that occur
fewer than 20 times in the training split (their embeddings barely train; byte-fallback and special pieces
left out), and the tokenizer's training time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.timing import print_table  # noqa: E402
from llama_mini.data import load_documents, split_documents  # noqa: E402
from llama_mini.tokenizer import train_tokenizer  # noqa: E402


def bytes_per_token(tokenizer, documents: list[str]) -> tuple[float, Counter]:
    counts: Counter = Counter()
    total_bytes = 0
    for document in documents:
        counts.update(tokenizer.encode(document))
        total_bytes += len(document.encode("utf-8"))
    return total_bytes / sum(counts.values()), counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="shakespeare")
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--split-seed", type=int, default=1337, help="train.py's default")
    args = parser.parse_args(argv)

    train, val = split_documents(load_documents(args.data), args.val_fraction, args.split_seed)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for vocab_size in args.vocab_sizes:
            started = time.perf_counter()
            tokenizer = train_tokenizer(train, Path(folder) / f"{vocab_size}.model", vocab_size)
            seconds = time.perf_counter() - started
            train_ratio, counts = bytes_per_token(tokenizer, train)
            val_ratio, _ = bytes_per_token(tokenizer, val)
            # Learned pieces only: the 256 byte-fallback pieces <0x00>..<0xFF> and <unk>, <s>, </s> are
            # rare by design.
            learned = [
                piece
                for piece in range(tokenizer.vocab_size)
                if not tokenizer.id_to_piece(piece).startswith("<")
            ]
            rare = sum(1 for piece in learned if counts[piece] < 20)
            rows.append(
                {
                    "vocab": vocab_size,
                    "train bytes/token": round(train_ratio, 2),
                    "val bytes/token": round(val_ratio, 2),
                    "learned pieces seen < 20 times": rare,
                    "training s": round(seconds, 1),
                }
            )
    print(f"corpus {args.data}: {len(train)} training and {len(val)} validation documents")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
