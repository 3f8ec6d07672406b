"""The serving engine: paged KV-cache bookkeeping, continuous-batching scheduler (model runner next)."""

from .block_manager import BlockManager, OutOfBlocksError
from .scheduler import QueueFullError, ScheduledChunk, Scheduler, SchedulerOutput
from .sequence import Sequence, SequenceStatus

__all__ = [
    "BlockManager",
    "OutOfBlocksError",
    "QueueFullError",
    "ScheduledChunk",
    "Scheduler",
    "SchedulerOutput",
    "Sequence",
    "SequenceStatus",
]
