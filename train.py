"""Train a llama_mini model: `python train.py` learns the default corpus (Shakespeare) on the device at hand.

    python train.py                                   # small model, default corpus, a few minutes on a CPU
    python train.py --data my_texts/ --out runs/mine  # your own .txt folder, .txt file or .jsonl
    python train.py --preset stories15m --max-steps 5000 --batch-size 64
    python train.py --out runs/mine --resume          # continue exactly where a run stopped
    torchrun --nproc_per_node=8 train.py --preset stories110m ...   # data-parallel on 8 GPUs

The same command as `llama-mini train`; its code is llama_mini/train/command.py.
"""

import sys

try:
    from llama_mini.train.command import main
except KeyboardInterrupt:  # Ctrl-C while torch is still loading: nothing has started, so nothing to save
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main())
