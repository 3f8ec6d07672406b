"""Trainer callbacks the training tests share."""

from __future__ import annotations

from transformers import TrainerCallback


class StopAt(TrainerCallback):
    """Ends training after `step` (as a stopped job would), after that step's checkpoint is saved."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step == self.step
