"""The study store (SQLAlchemy) and the spool of received files."""

from triage.store.db import StoreUnavailable, make_engine, upgrade_schema
from triage.store.models import StudyState
from triage.store.repository import InstanceMeta, RecordResult, Store, Transition

__all__ = [
    "InstanceMeta",
    "RecordResult",
    "Store",
    "StoreUnavailable",
    "StudyState",
    "Transition",
    "make_engine",
    "upgrade_schema",
]
