"""The serving engine: paged KV cache, continuous batching, mixed-adapter batches, sampling."""

from .adapters import AdapterRegistry, LoadedAdapter, load_serving_adapter
from .block_manager import BlockManager, OutOfBlocksError
from .engine import Engine, EngineConfig, StepOutput
from .sampling import SamplingParams
from .scheduler import QueueFullError, ScheduledChunk, Scheduler, SchedulerOutput
from .sequence import Sequence, SequenceStatus

__all__ = [
    "AdapterRegistry",
    "Engine",
    "EngineConfig",
    "LoadedAdapter",
    "SamplingParams",
    "StepOutput",
    "load_serving_adapter",
    "BlockManager",
    "OutOfBlocksError",
    "QueueFullError",
    "ScheduledChunk",
    "Scheduler",
    "SchedulerOutput",
    "Sequence",
    "SequenceStatus",
]
