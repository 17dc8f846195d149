"""memfit model store: versioned slot tables, atomic publish, hot swap, rollback, revert, audit.

Works on value tables `{layer: Tensor (N, d)}` and never needs the model loaded. No web or queue code
here (redis only lazily, inside RedisWriterLock).
"""

from .errors import (
    ActiveMovedError,
    BaseMismatchError,
    CorruptVersionError,
    DocumentNotTaught,
    IdempotencyConflict,
    InvalidTransition,
    LockTimeout,
    NeedsRetrain,
    RebaseConflict,
    RevertConflict,
    StoreError,
    StoreNotFoundError,
    UnknownVersionError,
)
from .joblog import Job, JobLog
from .locks import FileWriterLock, RedisWriterLock, WriterLock
from .store import PUBLISH_STEPS, GCPolicy, Store
from .swap import LiveTables, SwapLock, SwapResult

__all__ = [
    "ActiveMovedError",
    "BaseMismatchError",
    "CorruptVersionError",
    "DocumentNotTaught",
    "FileWriterLock",
    "GCPolicy",
    "IdempotencyConflict",
    "InvalidTransition",
    "Job",
    "JobLog",
    "LiveTables",
    "LockTimeout",
    "NeedsRetrain",
    "PUBLISH_STEPS",
    "RebaseConflict",
    "RedisWriterLock",
    "RevertConflict",
    "Store",
    "StoreError",
    "StoreNotFoundError",
    "SwapLock",
    "SwapResult",
    "UnknownVersionError",
    "WriterLock",
]
