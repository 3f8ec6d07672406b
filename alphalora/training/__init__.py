"""Training MoE-LoRA adapters on top of transformers.Trainer."""

from .api import TrainResult, train
from .data import DataError
from .trainer import MoELoRATrainer

__all__ = ["DataError", "MoELoRATrainer", "TrainResult", "train"]
