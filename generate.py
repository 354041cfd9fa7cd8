"""Generate text with a trained model: `python generate.py --checkpoint DIR --prompt "Once upon a time"`.

    python generate.py --checkpoint out/demo --prompt "ROMEO:"         # a run folder: its best/ checkpoint
    python generate.py --checkpoint out/demo/best --prompt "KING:" --num-samples 3 --seed 1
    python generate.py --checkpoint path/to/hf-or-meta-llama --interactive --temperature 0.7

The same command as `llama-mini generate`; its code is llama_mini/generation/command.py.
"""

import sys

try:
    from llama_mini.generation.command import main
except KeyboardInterrupt:  # Ctrl-C while torch is still loading: nothing has started, so nothing to save
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main())
