"""SQLAlchemy models: the single source of truth for study state.

Times are naive UTC (``utcnow()``), the same on SQLite and PostgreSQL.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    """The current time as naive UTC, the form every timestamp column holds."""
    return datetime.now(UTC).replace(tzinfo=None)


class StudyState(enum.StrEnum):
    """Where a study is in its life (see DESIGN.md, "Study states")."""

    RECEIVING = "RECEIVING"
    QUEUED = "QUEUED"
    SCORING = "SCORING"
    DELIVERING = "DELIVERING"
    DONE = "DONE"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"
    CANCELLED = "CANCELLED"


#: States a late instance re-opens as a new revision (back to RECEIVING).
REOPENED_BY_LATE_INSTANCE = frozenset(
    {
        StudyState.QUEUED,
        StudyState.SCORING,
        StudyState.DELIVERING,
        StudyState.DONE,
        StudyState.FAILED,
        StudyState.SKIPPED,
    }
)

_state_type = Enum(
    StudyState,
    native_enum=False,
    length=16,
    validate_strings=True,
    values_callable=lambda states: [s.value for s in states],
)


class Base(DeclarativeBase):
    """Declarative base of every table."""


class Study(Base):
    """One StudyInstanceUID and its current state."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    state: Mapped[StudyState] = mapped_column(_state_type, index=True)
    #: Incremented each time a late instance re-opens a study that was already complete.
    revision: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    state_changed_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_instance_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    #: The MURA study type once the worker decided it (``XR_WRIST`` …).
    study_type: Mapped[str | None] = mapped_column(String(16))
    #: Why the study is SKIPPED, FAILED or CANCELLED, or the last scoring error.
    state_reason: Mapped[str] = mapped_column(Text, default="")
    #: Scoring attempts in the current revision (a study fails after ``max_attempts``).
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: The worker claim: a token per claim, its owner, and when it expires.
    lease_token: Mapped[str | None] = mapped_column(String(36), index=True)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime)

    instances: Mapped[list[Instance]] = relationship(back_populates="study")
    events: Mapped[list[StudyEvent]] = relationship(
        back_populates="study", order_by="StudyEvent.id"
    )


class Instance(Base):
    """One received SOP instance and where its file is in the spool."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(16))
    #: Path relative to the spool root, so every host that mounts the spool can read it.
    path: Mapped[str] = mapped_column(String(160))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    #: The study revision this instance arrived in.
    revision: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    association_id: Mapped[int | None] = mapped_column(
        ForeignKey("associations.id", ondelete="SET NULL"), index=True
    )

    study: Mapped[Study] = relationship(back_populates="instances")


class StudyEvent(Base):
    """One state change of a study (its history)."""

    __tablename__ = "study_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    from_state: Mapped[StudyState | None] = mapped_column(_state_type)
    to_state: Mapped[StudyState] = mapped_column(_state_type)
    revision: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text, default="")

    study: Mapped[Study] = relationship(back_populates="events")


class AssociationOutcome(enum.StrEnum):
    """How an association ended."""

    ACTIVE = "ACTIVE"
    RELEASED = "RELEASED"
    ABORTED = "ABORTED"
    REJECTED = "REJECTED"


class AssociationRecord(Base):
    """Audit row for one incoming association: who, from where, what, and how it ended."""

    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    calling_ae: Mapped[str] = mapped_column(String(16))
    called_ae: Mapped[str] = mapped_column(String(16))
    peer_host: Mapped[str] = mapped_column(String(64))
    peer_port: Mapped[int] = mapped_column(Integer)
    tls: Mapped[bool] = mapped_column(default=False)
    listener_pid: Mapped[int] = mapped_column(Integer)
    #: The listener's host (None on rows written before migration 0004).
    listener_host: Mapped[str | None] = mapped_column(String(128))
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime)
    instances_stored: Mapped[int] = mapped_column(Integer, default=0)
    instances_duplicate: Mapped[int] = mapped_column(Integer, default=0)
    instances_failed: Mapped[int] = mapped_column(Integer, default=0)
    bytes_stored: Mapped[int] = mapped_column(BigInteger, default=0)
    echoes: Mapped[int] = mapped_column(Integer, default=0)
    outcome: Mapped[AssociationOutcome] = mapped_column(
        Enum(
            AssociationOutcome,
            native_enum=False,
            length=16,
            values_callable=lambda values: [v.value for v in values],
        )
    )
    reason: Mapped[str] = mapped_column(Text, default="")


class Result(Base):
    """The score of one study revision (the mean of its view probabilities)."""

    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("study_id", "revision", name="uq_results_study_revision"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    revision: Mapped[int] = mapped_column(Integer)
    study_type: Mapped[str] = mapped_column(String(16))
    probability: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    abnormal: Mapped[bool] = mapped_column(Boolean)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    model_validated: Mapped[bool] = mapped_column(Boolean)
    views_scored: Mapped[int] = mapped_column(Integer)
    views_skipped: Mapped[int] = mapped_column(Integer)
    scoring_ms: Mapped[float] = mapped_column(Float)
    scored_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)

    views: Mapped[list[ViewScore]] = relationship(back_populates="result", order_by="ViewScore.id")


class ViewScore(Base):
    """One view of a scored study: its probability, or why it was not scored."""

    __tablename__ = "view_scores"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    probability: Mapped[float | None] = mapped_column(Float)
    #: How the pixels were interpreted ("first of 3 frames" …), or why the view was skipped.
    note: Mapped[str] = mapped_column(Text, default="")
    skipped: Mapped[bool] = mapped_column(Boolean, default=False)

    result: Mapped[Result] = relationship(back_populates="views")


class Output(Base):
    """A DICOM object the daemon made for a study revision (SR, SC overlay, parametric map)."""

    __tablename__ = "outputs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    revision: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(8))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_uid: Mapped[str] = mapped_column(String(64))
    source_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    #: Path relative to the spool root (``outbox/…``).
    path: Mapped[str] = mapped_column(String(200))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    deliveries: Mapped[list[Delivery]] = relationship(back_populates="output")


class DeliveryState(enum.StrEnum):
    """Where one object is on its way to one destination."""

    PENDING = "PENDING"
    DONE = "DONE"
    FAILED = "FAILED"
    #: The study was re-opened by a late instance: a newer revision supersedes this output.
    CANCELLED = "CANCELLED"


class Delivery(Base):
    """One output to one destination: attempts, backoff and the peer's last answer."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("output_id", "destination", name="uq_deliveries_output_destination"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    output_id: Mapped[int] = mapped_column(ForeignKey("outputs.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[DeliveryState] = mapped_column(
        Enum(
            DeliveryState,
            native_enum=False,
            length=16,
            values_callable=lambda values: [v.value for v in values],
        ),
        index=True,
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime)

    output: Mapped[Output] = relationship(back_populates="deliveries")


class WorkerRecord(Base):
    """A worker process and its heartbeat (for `triage-admin status` and lease expiry)."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    host: Mapped[str] = mapped_column(String(128))
    pid: Mapped[int] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(32))
    model_version: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime)


class PurgedStudy(Base):
    """Where a purged study's revisions stopped.

    A study the PACS sends again after the purge removed it continues at the next revision:
    its outputs then get new UIDs. Starting again at revision 1 would give a new finding the
    UIDs of the purged one, and a PACS keeps the first instance it gets under a UID.
    """

    __tablename__ = "purged_studies"

    study_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_revision: Mapped[int] = mapped_column(Integer)
    purged_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
