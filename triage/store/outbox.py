"""Delivery bookkeeping: which output goes to which destination, attempts and backoff.

A sender claims due deliveries by pushing their ``next_attempt_at`` past a lease, sends them,
then records each answer. A sender that dies between sending and recording leaves the delivery
due again after the lease: the same SOP instances (deterministic UIDs) are sent again, never new
ones. A study reaches DONE only when every destination acknowledged every object of its current
revision.

``next_attempt_at`` (a lease, a backoff, due now) is kept on :meth:`Store.database_now`'s
clock: on PostgreSQL the senders of several hosts share the outbox, and one whose clock lagged
another's by a lease made its claims due to the others at once (each object sent twice).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from triage.store.models import Delivery, DeliveryState, Output, Study, StudyState, utcnow
from triage.store.repository import Store, add_event


@dataclass(frozen=True)
class DueDelivery:
    """One object to send to one destination now."""

    delivery_id: int
    study_uid: str
    revision: int
    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    path: str
    attempt: int
    #: The ``next_attempt_at`` the claim set: the claim is still this sender's while the row
    #: holds it (see :meth:`Outbox.hold`).
    lease_until: datetime | None = None


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: start, start·factor, … capped, for at most max_attempts."""

    start_s: float
    factor: float
    max_s: float
    max_attempts: int

    def delay(self, attempt: int) -> float:
        """Seconds to wait after the *attempt*-th failed attempt (1-based)."""
        return min(self.max_s, self.start_s * self.factor ** max(0, attempt - 1))


class Outbox:
    """Delivery operations on a :class:`Store`."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._postgres = store.engine.dialect.name == "postgresql"

    def claim_due(self, destination: str, limit: int, lease_s: float) -> list[DueDelivery]:
        """Deliveries to *destination* that are due, for the current revision of their study."""

        def work(session: Session) -> list[DueDelivery]:
            now = self.store.database_now(session.connection())
            statement = (
                select(Delivery, Output, Study)
                .join(Output, Delivery.output_id == Output.id)
                .join(Study, Output.study_id == Study.id)
                .where(
                    Delivery.destination == destination,
                    Delivery.state == DeliveryState.PENDING,
                    Delivery.next_attempt_at <= now,
                    Output.revision == Study.revision,
                    # FAILED too: a destination that failed for good does not hold back the
                    # others (the study stays FAILED; `triage-admin retry` resumes it).
                    Study.state.in_((StudyState.DELIVERING, StudyState.FAILED)),
                )
                .order_by(Delivery.next_attempt_at, Delivery.id)
                .limit(limit)
            )
            if self._postgres:
                statement = statement.with_for_update(of=Delivery, skip_locked=True)
            due = []
            lease_until = now + timedelta(seconds=lease_s)
            for delivery, output, study in session.execute(statement).all():
                delivery.attempts += 1
                delivery.next_attempt_at = lease_until
                due.append(
                    DueDelivery(
                        delivery_id=delivery.id,
                        study_uid=study.study_uid,
                        revision=output.revision,
                        kind=output.kind,
                        sop_class_uid=output.sop_class_uid,
                        sop_instance_uid=output.sop_instance_uid,
                        path=output.path,
                        attempt=delivery.attempts,
                        lease_until=lease_until,
                    )
                )
            return due

        return self.store.transaction(work)

    def delivered(self, delivery_id: int, status: int = 0) -> str | None:
        """Record an acknowledged delivery; returns the study UID if the study is now DONE."""

        def work(session: Session) -> str | None:
            delivery = self._with_study_locked(session, delivery_id)
            if (
                delivery is not None
                and delivery.state is DeliveryState.CANCELLED
                and delivery.delivered_at is None  # the same acknowledgement, recorded already
            ):
                # Cancelled while its C-STORE ran: the PACS holds it all the same, and the
                # store must say so (the operator may have to remove it there).
                delivery.delivered_at = utcnow()
                delivery.last_status = status
                delivery.last_error = f"acknowledged after it was cancelled ({delivery.last_error})"
                return None
            if delivery is None or delivery.state is not DeliveryState.PENDING:
                return None
            now = utcnow()
            delivery.state = DeliveryState.DONE
            delivery.delivered_at = now
            delivery.last_status = status
            delivery.last_error = ""
            return self._finish_study_if_delivered(session, delivery.output_id, now)

        return self.store.transaction(work)

    def hold(self, item: DueDelivery, lease_s: float) -> bool:
        """Renew *item*'s claim for *lease_s* just before its C-STORE. False when it is no
        longer pending (cancelled, superseded) or no longer this sender's: a batch can outlast
        its lease (slow objects), and another daemon on the store then claims the rest of it,
        which this one must not send as well."""

        def work(session: Session) -> bool:
            conditions = [Delivery.id == item.delivery_id, Delivery.state == DeliveryState.PENDING]
            if item.lease_until is not None:
                conditions.append(Delivery.next_attempt_at == item.lease_until)
            lease_until = self.store.database_now(session.connection()) + timedelta(seconds=lease_s)
            renewed = session.execute(
                update(Delivery).where(*conditions).values(next_attempt_at=lease_until)
            )
            return renewed.rowcount == 1

        return self.store.transaction(work)

    def _with_study_locked(self, session: Session, delivery_id: int) -> Delivery | None:
        """The delivery, read after its study's row is locked.

        Study first, then its deliveries: the order in which a late instance (which cancels
        the study's pending deliveries) and `cancel` take them. Updating the delivery first
        deadlocked against a late instance on PostgreSQL, and the loser was a C-STORE.
        """
        output_id = session.scalar(select(Delivery.output_id).where(Delivery.id == delivery_id))
        if output_id is None:
            return None
        study_id = select(Output.study_id).where(Output.id == output_id).scalar_subquery()
        session.execute(self._locked(select(Study.id).where(Study.id == study_id)))
        # Read now, under the lock: a late instance may have cancelled it meanwhile.
        return session.get(Delivery, delivery_id, populate_existing=True)

    def _finish_study_if_delivered(
        self, session: Session, output_id: int, now: datetime
    ) -> str | None:
        output = session.get(Output, output_id)
        assert output is not None
        study = session.scalar(self._locked(select(Study).where(Study.id == output.study_id)))
        if study is None or study.state is not StudyState.DELIVERING:
            return None
        if output.revision != study.revision:
            return None
        outstanding = session.scalar(
            select(func.count())
            .select_from(Delivery)
            .join(Output, Delivery.output_id == Output.id)
            .where(
                Output.study_id == study.id,
                Output.revision == study.revision,
                # Cancelled: superseded by a rescoring of the same revision.
                Delivery.state == DeliveryState.PENDING,
            )
        )
        if outstanding:
            return None
        failed = session.scalars(
            select(Delivery)
            .join(Output, Delivery.output_id == Output.id)
            .where(
                Output.study_id == study.id,
                Output.revision == study.revision,
                Delivery.state == DeliveryState.FAILED,
            )
            .order_by(Delivery.id)
        ).first()
        if failed is not None:
            # The rest are through, this one is not (a retry of another delivery brought the
            # study back to DELIVERING): FAILED, as a study with any failed delivery is.
            reason = f"delivery to {failed.destination} failed: {failed.last_error}"
            study.state = StudyState.FAILED
            study.state_reason = reason
            study.state_changed_at = now
            add_event(session, study, StudyState.DELIVERING, reason, now)
            return None
        previous = study.state
        study.state = StudyState.DONE
        study.state_changed_at = now
        add_event(session, study, previous, "every destination acknowledged every object", now)
        return study.study_uid

    def _locked(self, statement):  # type: ignore[no-untyped-def]
        return statement.with_for_update() if self._postgres else statement

    def failed(
        self,
        delivery_id: int,
        error: str,
        backoff: Backoff | None = None,
        *,
        status: int | None = None,
        permanent: bool = False,
    ) -> DeliveryState | None:
        """Record a failed attempt: retry after the backoff, or FAILED (and the study too).

        *backoff* is needed unless *permanent*: a permanent failure is never retried.
        """
        if backoff is None and not permanent:
            raise ValueError("a failure that may be retried needs a backoff")

        def work(session: Session) -> DeliveryState | None:
            delivery = self._with_study_locked(session, delivery_id)
            if delivery is None or delivery.state is not DeliveryState.PENDING:
                return None
            now = utcnow()
            delivery.last_status = status
            delivery.last_error = error[:1000]
            if backoff is None or permanent or delivery.attempts >= backoff.max_attempts:
                delivery.state = DeliveryState.FAILED
                output = session.get(Output, delivery.output_id)
                assert output is not None
                study = session.scalar(
                    self._locked(select(Study).where(Study.id == output.study_id))
                )
                if (
                    study is not None
                    and study.state is StudyState.DELIVERING
                    and study.revision == output.revision
                ):
                    reason = f"delivery to {delivery.destination} failed: {error}"
                    study.state = StudyState.FAILED
                    study.state_reason = reason
                    study.state_changed_at = now
                    add_event(session, study, StudyState.DELIVERING, reason, now)
            else:
                delay = timedelta(seconds=backoff.delay(delivery.attempts))
                delivery.next_attempt_at = self.store.database_now(session.connection()) + delay
            return delivery.state

        return self.store.transaction(work)

    def not_tried(
        self,
        delivery_id: int,
        reason: str,
        delay_s: float,
        lease_until: datetime | None = None,
    ) -> bool:
        """Give back a claimed delivery that was never attempted (its association ended
        before its turn): it is due again after *delay_s*, and the claim's attempt is not
        counted. Returns whether it was still pending (and, with *lease_until*, the claim
        still this sender's: another daemon's claim of it, its lease run out, stays)."""

        def work(session: Session) -> bool:
            delivery = self._with_study_locked(session, delivery_id)
            if delivery is None or delivery.state is not DeliveryState.PENDING:
                return False
            if lease_until is not None and delivery.next_attempt_at != lease_until:
                return False
            delivery.attempts = max(0, delivery.attempts - 1)
            due = self.store.database_now(session.connection()) + timedelta(seconds=delay_s)
            delivery.next_attempt_at = due
            delivery.last_error = reason[:1000]
            return True

        return self.store.transaction(work)

    def retry(
        self,
        *,
        delivery_ids: Sequence[int] | None = None,
        study_uid: str | None = None,
        configured: Sequence[str] | None = None,
    ) -> list[int]:
        """Start FAILED deliveries again (one, a study's, or all); their studies go back to
        DELIVERING. Only those to a *configured* destination, when given: nothing would send
        the others, and their studies would wait in DELIVERING for ever. Returns the ids of
        the deliveries restarted."""

        def work(session: Session) -> list[int]:
            now = utcnow()
            # Due now for the senders, maybe on other hosts (see the module's docstring).
            due = self.store.database_now(session.connection())
            statement = (
                select(Delivery, Output, Study)
                .join(Output, Delivery.output_id == Output.id)
                .join(Study, Output.study_id == Study.id)
                .where(
                    Delivery.state == DeliveryState.FAILED,
                    Output.revision == Study.revision,
                    # Not a cancelled study (nothing is sent), nor one being scored again
                    # (requeued: its new outputs supersede these).
                    Study.state.in_((StudyState.FAILED, StudyState.DELIVERING)),
                )
            )
            if delivery_ids is not None:
                statement = statement.where(Delivery.id.in_(list(delivery_ids)))
            if study_uid is not None:
                statement = statement.where(Study.study_uid == study_uid)
            if configured is not None:
                statement = statement.where(Delivery.destination.in_(list(configured)))
            # Lock the studies first (in id order), then read what to restart under the lock:
            # read unlocked, a cancel or a late instance committed meanwhile was overwritten
            # on PostgreSQL (a cancelled study's results sent; a superseded revision's
            # deliveries PENDING again, its study in DELIVERING for ever).
            study_ids = sorted(set(session.scalars(statement.with_only_columns(Study.id))))
            if not study_ids:
                return []
            session.execute(
                self._locked(select(Study.id).where(Study.id.in_(study_ids)).order_by(Study.id))
            )
            statement = statement.where(Study.id.in_(study_ids))
            rows = session.execute(statement.execution_options(populate_existing=True)).all()
            restarted = []
            for delivery, _output, study in rows:
                delivery.state = DeliveryState.PENDING
                delivery.attempts = 0
                delivery.next_attempt_at = due
                delivery.last_error = ""
                restarted.append(delivery.id)
                if study.state is StudyState.FAILED:
                    study.state = StudyState.DELIVERING
                    study.state_reason = ""
                    study.state_changed_at = now
                    add_event(session, study, StudyState.FAILED, "delivery retried", now)
            return sorted(restarted)

        return self.store.transaction(work)

    def fail_unconfigured(self, configured: Sequence[str]) -> list[str]:
        """Fail for good every delivery still to make to a destination not in *configured*
        (removed or renamed in the config: nothing would ever send it, and its study would
        wait in DELIVERING for ever). Returns the destinations it failed deliveries to."""
        with self.store.read_session() as session:
            rows = session.execute(
                select(Delivery.id, Delivery.destination).where(
                    Delivery.state == DeliveryState.PENDING,
                    Delivery.destination.not_in(list(configured)),
                )
            ).all()
        for delivery_id, destination in rows:
            self.failed(
                delivery_id, f"destination {destination} is no longer configured", permanent=True
            )
        return sorted({destination for _, destination in rows})

    def pending_destinations(self) -> list[str]:
        """Every destination that deliveries still wait for."""
        with self.store.read_session() as session:
            return sorted(
                session.scalars(
                    select(Delivery.destination)
                    .where(Delivery.state == DeliveryState.PENDING)
                    .distinct()
                )
            )

    def release_leases(self) -> int:
        """Make every claimed (or backing-off) PENDING delivery due now: for a restart of the
        only sender. Returns how many."""

        def work(session: Session) -> int:
            now = self.store.database_now(session.connection())
            rows = session.scalars(
                select(Delivery).where(
                    Delivery.state == DeliveryState.PENDING,
                    Delivery.attempts > 0,
                    Delivery.next_attempt_at > now,
                )
            ).all()
            for delivery in rows:
                delivery.next_attempt_at = now
            return len(rows)

        return self.store.transaction(work)

    def deliveries(self, study_uid: str) -> list[tuple[Delivery, Output]]:
        """Every delivery of a study with its output, oldest first."""
        with self.store.read_session() as session:
            rows = session.execute(
                select(Delivery, Output)
                .join(Output, Delivery.output_id == Output.id)
                .join(Study, Output.study_id == Study.id)
                .where(Study.study_uid == study_uid)
                .order_by(Output.revision, Output.id, Delivery.destination)
            ).all()
            return [(delivery, output) for delivery, output in rows]
