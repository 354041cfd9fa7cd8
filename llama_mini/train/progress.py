"""What a run shows on the terminal while it trains: a tqdm bar over the steps, with the loss, the learning
rate, tokens/s and MFU; messages (evaluations, the fast paths chosen) printed above it."""

from __future__ import annotations

from typing import Any

__all__ = ["Progress"]


class Progress:
    """A tqdm bar over the steps (or nothing, on other ranks and in tests)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def update_postfix(self, record: dict[str, Any]) -> None:
        if self.bar is not None:
            postfix = {
                "loss": f"{record['loss']:.3f}",
                "lr": f"{record['lr']:.1e}",
                "tok/s": f"{record['tokens_per_second']:,.0f}",
            }
            if "mfu" in record:
                postfix["mfu"] = f"{100 * record['mfu']:.1f}%"
            self.bar.set_postfix(postfix, refresh=False)

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
