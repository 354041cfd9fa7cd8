"""What a run shows while it trains: on a terminal, a tqdm bar over the steps with the loss, the learning
rate, tokens/s and MFU; anywhere else (a file, SLURM, CI), one plain line per --log-interval, since a bar
redrawn with carriage returns fills a log with fragments. Messages (evaluations, the fast paths chosen)
are printed above the bar, or as lines of their own."""

from __future__ import annotations

import sys
import time
from typing import Any

from llama_mini.console import duration, stderr_is_terminal

__all__ = ["Progress"]


class Progress:
    """A tqdm bar over the steps on a terminal, plain lines elsewhere (nothing on other ranks and in
    tests)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        self.total, self.initial, self.step = total, initial, initial
        self.plain = enabled and not stderr_is_terminal()
        self.started = time.perf_counter()
        if enabled and not self.plain:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def advance(self) -> None:
        self.step += 1
        if self.bar is not None:
            self.bar.update(1)

    def update_postfix(self, record: dict[str, Any]) -> None:
        """Show a train record of metrics.jsonl: in the bar, or as one line."""
        if self.bar is not None:
            postfix = {
                "loss": f"{record['loss']:.3f}",
                "lr": f"{record['lr']:.1e}",
                "tok/s": f"{record['tokens_per_second']:,.0f}",
            }
            if "mfu" in record:
                postfix["mfu"] = f"{100 * record['mfu']:.1f}%"
            self.bar.set_postfix(postfix, refresh=False)
        elif self.plain:
            self.write(self.line(record))

    def line(self, record: dict[str, Any]) -> str:
        """`step 20/600 | loss 3.412 | lr 1.0e-03 | 12,345 tok/s | elapsed 0:00:41 | remaining 0:19:49`;
        the remaining time is this session's pace so far times the steps left."""
        step = record["step"]
        parts = [
            f"step {step}/{self.total}",
            f"loss {record['loss']:.4f}",
            f"lr {record['lr']:.2e}",
            f"{record['tokens_per_second']:,.0f} tok/s",
        ]
        if "mfu" in record:
            parts.append(f"mfu {100 * record['mfu']:.1f}%")
        elapsed = time.perf_counter() - self.started
        done = step - self.initial
        remaining = elapsed / done * (self.total - step) if done > 0 else None
        parts.append(f"elapsed {duration(elapsed)}")
        parts.append(f"remaining {duration(remaining) if remaining is not None else '?'}")
        return " | ".join(parts)

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        elif self.plain:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
