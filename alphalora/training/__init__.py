"""Training MoE-LoRA adapters on top of transformers.Trainer."""

from .api import TrainResult, train
from .data import DataError
from .trainer import CheckpointError, MoELoRATrainer

__all__ = ["CheckpointError", "DataError", "MoELoRATrainer", "TrainResult", "train"]
