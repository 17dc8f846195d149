"""Errors raised by the store. Every message names the version, slots or file it is about."""

from __future__ import annotations

from typing import Any


class StoreError(Exception):
    """Base class of every model_store error."""


class StoreNotFoundError(StoreError):
    pass


class BaseMismatchError(StoreError):
    pass


class UnknownVersionError(StoreError, KeyError):
    def __init__(self, version: int, detail: str = "") -> None:
        self.version = version
        super().__init__(f"version {version} does not exist in this store{': ' + detail if detail else ''}")

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class CorruptVersionError(StoreError):
    """A version whose manifest or delta file is missing, truncated or fails its checksum."""

    def __init__(self, version: int, reason: str) -> None:
        self.version = version
        self.reason = reason
        super().__init__(f"version {version} is corrupted: {reason}")


class ActiveMovedError(StoreError):
    """Compare-and-set failed: the active version is not the parent the delta was trained from."""

    def __init__(self, expected: int, actual: int) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(f"active version moved: expected {expected}, found {actual}")


class RebaseConflict(StoreError):
    """The delta's slots overlap slots changed between its parent and the new active version."""

    def __init__(self, parent: int, target: int, conflicts: dict[int, dict[int, list[int]]]) -> None:
        self.parent = parent
        self.target = target
        self.conflicts = conflicts  # {version: {layer: [slots]}}
        n = sum(len(s) for per in conflicts.values() for s in per.values())
        super().__init__(
            f"cannot rebase from {parent} onto {target}: {n} slots overlap versions {sorted(conflicts)}"
        )


class RevertConflict(StoreError):
    """A later version in the active chain rewrote some of the slots of the version to revert."""

    def __init__(self, version: int, conflicts: dict[int, dict[int, list[int]]]) -> None:
        self.version = version
        self.conflicts = conflicts  # {later version: {layer: [slots]}}
        parts = []
        for v, per in sorted(conflicts.items()):
            for layer, slots in sorted(per.items()):
                shown = ", ".join(map(str, slots[:8])) + (", ..." if len(slots) > 8 else "")
                parts.append(f"version {v} layer {layer} slots [{shown}] ({len(slots)})")
        super().__init__(
            f"cannot revert version {version} exactly: later versions rewrote its slots: " + "; ".join(parts)
        )


class DocumentNotTaught(StoreError):
    """A document revert of a document no version of the active chain taught."""

    def __init__(self, document_id: str, active: int) -> None:
        self.document_id = document_id
        self.active = active
        super().__init__(f"document {document_id!r} is not taught by the active version {active}")


class NeedsRetrain(StoreError):
    """A document revert that is not exact: its version also taught other documents.

    The training pipeline (workers.operations.revert_document) retrains `parent` on `remaining_documents`
    (full document records from the log) and publishes the result with a revert label.
    """

    def __init__(
        self,
        document_id: str,
        version: int,
        parent: int,
        remaining_documents: list[dict[str, Any]],
        settings: dict[str, Any],
    ) -> None:
        self.document_id = document_id
        self.version = version
        self.parent = parent
        self.remaining_documents = remaining_documents
        self.settings = settings
        super().__init__(
            f"document {document_id!r} shares version {version} with {len(remaining_documents)} other "
            f"documents: reverting it needs a retrain of that batch without it"
        )


class InvalidTransition(StoreError):
    pass


class IdempotencyConflict(StoreError):
    def __init__(self, key: str, job_id: str) -> None:
        self.key = key
        self.job_id = job_id
        super().__init__(f"idempotency key {key!r} was used by job {job_id} with a different body")


class LockTimeout(StoreError):
    pass
