"""Failures the restart tests inject into a real training run, through the Trainer's hooks.

They live in the package (not in tests/) because Ray Train unpickles them in its worker processes,
which import by module path; production configs cannot reach them.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

from aigd.loop import Trainer, TrainerHook


@dataclass
class FailAtStep(TrainerHook):
    """At this optimizer step of a first attempt (not after a restart): raise, or SIGKILL the rank-0
    process halfway through writing its next checkpoint."""

    step: int
    how: str = "exception"  # or "sigkill_in_checkpoint"
    armed: bool = False

    def after_step(self, trainer: Trainer) -> None:
        if trainer.restored is not None or trainer.state.global_step != self.step:
            return
        if self.how == "exception":
            raise RuntimeError(f"injected failure at step {self.step}")
        self.armed = True

    def during_checkpoint(self, trainer: Trainer) -> None:
        if self.armed:
            os.kill(os.getpid(), signal.SIGKILL)
