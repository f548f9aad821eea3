"""Progress of a run on stderr: a live tqdm bar on a terminal; otherwise one line per epoch."""
from __future__ import annotations

import logging
import sys

log = logging.getLogger("pllcli.training")


class Progress:
    """`step(**postfix)` after each optimiser step, `epoch(line)` after each epoch, `close()`."""

    def __init__(self, total: int, initial: int = 0, desc: str = "train", enabled: bool = True):
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, file=sys.stderr, unit="step", dynamic_ncols=True,
                            desc=desc, mininterval=1.0, leave=False)
        self.n = 0

    def step(self, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.n += 1
            if self.n % 10 == 1 and postfix:
                self.bar.set_postfix(**postfix, refresh=False)

    def epoch(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            log.info("%s", line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
