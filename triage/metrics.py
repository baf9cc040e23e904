"""Prometheus metrics of the daemon (served on ``/metrics`` by :mod:`triage.httpd`).

Three kinds:

- **observed in-process** — histograms of scoring time per view and per study (the worker), of
  end-to-end latency (first instance of a revision received → study DONE, observed when the
  sender or the worker completes a study), a counter of delivery attempts by outcome (the
  sender) and one of output builds by where they ran (the worker);
- **read from this process's worker at scrape time** (:class:`WorkerCollector`) — its studies
  in flight, the views waiting for the model, the jobs waiting for a decode process and how
  many decode processes it has: whether decoding or the model is what a busy worker waits
  for. ``triage serve`` and ``triage worker`` each report their own;
- **derived from the store at scrape time** (:class:`StoreCollector`) — the listener runs in
  other processes, so association and instance counts are read from the ``associations`` audit
  table (incrementally, see :class:`~triage.store.queries.AssociationCounter`), and studies and
  deliveries per state, the oldest queued age and the spool's free space are read as they are.
  These are the site's totals: every listener and worker writing to the same database counts.

Every metric is named ``triage_*`` and lives in :data:`REGISTRY`, not prometheus_client's global
registry, so importing this module twice (tests) or beside other libraries never clashes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from triage.health import BoundedCall
from triage.logs import get_logger
from triage.store.models import utcnow
from triage.store.queries import (
    AssociationCounter,
    AssociationTotals,
    delivery_counts,
    oldest_queued_at,
    study_counts,
    study_latency_s,
)
from triage.store.repository import Store
from triage.store.spool import Spool
from triage.tls_expiry import Certificate, CertificateCollector

log = get_logger("triage.metrics")

#: How long a scrape waits for the store before it reports ``triage_store_up 0`` (Prometheus'
#: default scrape timeout is 10 s; /readyz waits as long).
SCRAPE_STORE_TIMEOUT_S = 3.0

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

VIEW_SCORING_SECONDS = Histogram(
    "triage_view_scoring_seconds",
    "Model time per view: the forward pass of a batch divided by its views",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    registry=REGISTRY,
)
STUDY_SCORING_SECONDS = Histogram(
    "triage_study_scoring_seconds",
    "Claim to result recorded, per study (decoding, model, SR and overlays)",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
    registry=REGISTRY,
)
STUDY_LATENCY_SECONDS = Histogram(
    "triage_study_latency_seconds",
    "First instance of the study revision received to study DONE (quiet period included)",
    buckets=(1.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 14400.0),
    registry=REGISTRY,
)
DELIVERY_ATTEMPTS = Counter(
    "triage_delivery_attempts",
    "C-STORE attempts of this daemon's sender: delivered, retry (will be tried again), failed",
    ["destination", "outcome"],
    registry=REGISTRY,
)
#: The values of DELIVERY_ATTEMPTS' ``outcome`` label.
DELIVERY_OUTCOMES = ("delivered", "retry", "failed")
OUTPUTS_BUILT = Counter(
    "triage_worker_outputs_built",
    "Studies whose SR and overlays were built, by where: a decode process, or the worker's own"
    " process while its model was idle (no view to score, or a CPU model waiting for one)",
    ["where"],
    registry=REGISTRY,
)
MODEL = Info(
    "triage_model",
    "The scoring model in use (from its model card) and the device it runs on",
    registry=REGISTRY,
)


def set_model(name: str, version: str, validated: bool, device: str) -> None:
    """Publish the model in use (``triage_model_info``)."""
    MODEL.info(
        {
            "name": name,
            "version": version,
            "validated": "true" if validated else "false",
            "device": device,
        }
    )


def expect_destinations(names: Iterable[str]) -> None:
    """Start ``triage_delivery_attempts_total`` at 0 for each destination and outcome.

    A labelled counter's series otherwise first appears at 1, with its first attempt: then
    ``increase()`` and ``rate()`` cannot see that attempt, and an alert on failed deliveries
    missed the first failure after every start (and every failure of a site that fails
    rarely)."""
    for name in names:
        for outcome in DELIVERY_OUTCOMES:
            DELIVERY_ATTEMPTS.labels(name, outcome)


def observe_views(seconds: float, views: int) -> None:
    """A forward pass of *views* views took *seconds*."""
    if views > 0:
        per_view = seconds / views
        for _ in range(views):
            VIEW_SCORING_SECONDS.observe(per_view)


def observe_study_done(store: Store, study_uid: str) -> None:
    """A study reached DONE: observe its end-to-end latency (never raises)."""
    try:
        latency = study_latency_s(store, study_uid)
    except Exception as exc:  # a metric must never break delivery
        log.warning("latency_metric_failed", study_uid=study_uid, error=str(exc))
        return
    if latency is not None:
        STUDY_LATENCY_SECONDS.observe(latency)


class StoreCollector(Collector):
    """Metrics read from the store (and the spool) at each scrape; a few cheap queries."""

    def __init__(self, store: Store, spool: Spool) -> None:
        self.store = store
        self.spool = spool
        self._associations = AssociationCounter()
        # One thread reads for every scrape, so overlapping scrapes (threaded HTTP server) never
        # enter the incremental counter together, and a store that does not answer costs
        # each scrape SCRAPE_STORE_TIMEOUT_S at most, not a blocked thread.
        self._store_call = BoundedCall(
            "metrics-store", SCRAPE_STORE_TIMEOUT_S, busy="the previous scrape is still waiting"
        )
        # statvfs on a hung network filesystem (a shared spool) never returns: bounded too.
        self._spool_call = BoundedCall(
            "metrics-spool", SCRAPE_STORE_TIMEOUT_S, busy="the previous spool read is waiting"
        )

    def describe(self) -> Iterator[Metric]:
        """Nothing up front: registering must not query the store."""
        return iter(())

    def collect(self) -> Iterator[Metric]:
        """One read transaction; ``triage_store_up 0`` (and no store metrics) if it fails."""
        started = time.monotonic()
        up = GaugeMetricFamily("triage_store_up", "1 if the last scrape could read the store")
        families: list[Metric] = []
        try:
            now, totals, studies, oldest, deliveries = self._store_call(self._read)
        except Exception as exc:
            log.warning("metrics_store_unavailable", error=f"{type(exc).__name__}: {exc}")
            up.add_metric([], 0)
        else:
            up.add_metric([], 1)
            associations = CounterMetricFamily(
                "triage_associations",
                "Incoming associations that ended, by outcome (from the audit table)",
                labels=["outcome"],
            )
            for outcome, count in totals.by_outcome.items():
                if outcome != "ACTIVE":
                    associations.add_metric([outcome.lower()], count)
            active = GaugeMetricFamily(
                "triage_associations_active", "Associations in progress (audit rows still open)"
            )
            active.add_metric([], totals.by_outcome.get("ACTIVE", 0))
            instances = CounterMetricFamily(
                "triage_instances_received",
                "C-STORE requests by outcome: stored, duplicate (already held), failed;"
                " counted when their association ends",
                labels=["outcome"],
            )
            instances.add_metric(["stored"], totals.stored)
            instances.add_metric(["duplicate"], totals.duplicate)
            instances.add_metric(["failed"], totals.failed)
            received = CounterMetricFamily(
                "triage_received_bytes", "Bytes of instances stored in the spool"
            )
            received.add_metric([], totals.bytes_stored)
            echoes = CounterMetricFamily("triage_echoes", "C-ECHO requests answered")
            echoes.add_metric([], totals.echoes)
            by_state = GaugeMetricFamily(
                "triage_studies", "Studies in the store by state", labels=["state"]
            )
            for state, count in studies.items():
                by_state.add_metric([state], count)
            queued = GaugeMetricFamily(
                "triage_oldest_queued_age_seconds",
                "How long the study waiting longest in QUEUED has waited (0 when none waits)",
            )
            # Never below 0: on a shared store the study may have been queued by a host
            # whose clock is a little ahead of this one's.
            age = 0.0 if oldest is None else max(0.0, (now - oldest).total_seconds())
            queued.add_metric([], age)
            delivery_states = GaugeMetricFamily(
                "triage_deliveries", "Deliveries in the store by state", labels=["state"]
            )
            for state, count in deliveries.items():
                delivery_states.add_metric([state], count)
            families += [
                associations,
                active,
                instances,
                received,
                echoes,
                by_state,
                queued,
                delivery_states,
            ]
        yield up
        yield from families
        free = GaugeMetricFamily("triage_spool_free_bytes", "Free space on the spool filesystem")
        floor = GaugeMetricFamily(
            "triage_spool_min_free_bytes", "C-STORE is refused below this free space"
        )
        try:
            free.add_metric([], self._spool_call(self.spool.free_bytes))
            floor.add_metric([], self.spool.min_free_bytes)
            yield free
            yield floor
        except OSError as exc:  # StoreNotAnswering too: no figure rather than a hung scrape
            log.warning("metrics_spool_unavailable", error=f"{type(exc).__name__}: {exc}")
        took = GaugeMetricFamily(
            "triage_scrape_store_seconds", "Time this scrape spent reading the store"
        )
        took.add_metric([], time.monotonic() - started)
        yield took

    def _read(
        self,
    ) -> tuple[datetime, AssociationTotals, dict[str, int], datetime | None, dict[str, int]]:
        with self.store.read_session() as session:
            now = utcnow()
            return (
                now,
                self._associations.totals(session, now),
                study_counts(session),
                oldest_queued_at(session),
                delivery_counts(session),
            )

    def close(self) -> None:
        """Let the reading threads go (a read still waiting is abandoned)."""
        self._store_call.close()
        self._spool_call.close()


@dataclass(frozen=True)
class WorkerLoad:
    """What a worker has in hand at one moment (see :meth:`Worker.load`)."""

    #: Studies claimed and not yet recorded.
    studies_in_flight: int
    #: Views handed to the decode processes and not yet through the forward pass.
    views_waiting: int
    #: Decodes waiting for a decode process (the model waits for these).
    decodes_waiting: int
    #: SR and overlay jobs waiting for a decode process (only the PACS waits for these).
    outputs_waiting: int
    #: The worker's decode processes.
    decode_processes: int


class WorkerCollector(Collector):
    """The load of this process's worker at each scrape (no store query)."""

    def __init__(self, load: Callable[[], WorkerLoad]) -> None:
        self._load = load

    def describe(self) -> Iterator[Metric]:
        """Nothing up front: registering must not ask the worker."""
        return iter(())

    def collect(self) -> Iterator[Metric]:
        """The worker's gauges, read now."""
        load = self._load()
        yield _gauge(
            "triage_worker_studies_in_flight",
            "Studies this worker has claimed and not yet recorded",
            load.studies_in_flight,
        )
        yield _gauge(
            "triage_worker_views_waiting",
            "Views being decoded or waiting for the forward pass",
            load.views_waiting,
        )
        waiting = GaugeMetricFamily(
            "triage_worker_jobs_waiting",
            "Jobs waiting for a decode process: decode (the model waits) or outputs",
            labels=["job"],
        )
        waiting.add_metric(["decode"], load.decodes_waiting)
        waiting.add_metric(["outputs"], load.outputs_waiting)
        yield waiting
        yield _gauge(
            "triage_worker_decode_processes",
            "Processes decoding views and building outputs for this worker",
            load.decode_processes,
        )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


_collector: StoreCollector | None = None
_worker_collector: WorkerCollector | None = None
_certificate_collector: CertificateCollector | None = None


def register_store(store: Store, spool: Spool) -> None:
    """Serve store-derived metrics for *store* (replaces an earlier registration)."""
    global _collector
    if _collector is not None:
        REGISTRY.unregister(_collector)
        _collector.close()
    _collector = StoreCollector(store, spool)
    REGISTRY.register(_collector)


def register_certificates(certificates: list[Certificate]) -> None:
    """Serve the TLS certificates' ends of validity (replaces an earlier registration)."""
    global _certificate_collector
    if _certificate_collector is not None:
        REGISTRY.unregister(_certificate_collector)
    _certificate_collector = CertificateCollector(certificates)
    REGISTRY.register(_certificate_collector)


def register_worker(load: Callable[[], WorkerLoad]) -> None:
    """Serve the ``triage_worker_*`` gauges from *load* (replaces an earlier registration)."""
    global _worker_collector
    if _worker_collector is not None:
        REGISTRY.unregister(_worker_collector)
    _worker_collector = WorkerCollector(load)
    REGISTRY.register(_worker_collector)
    # Both series from 0 (see expect_destinations): only a process with a worker has them.
    for where in ("decode_process", "worker"):
        OUTPUTS_BUILT.labels(where)


__all__ = [
    "DELIVERY_ATTEMPTS",
    "DELIVERY_OUTCOMES",
    "OUTPUTS_BUILT",
    "REGISTRY",
    "STUDY_LATENCY_SECONDS",
    "STUDY_SCORING_SECONDS",
    "VIEW_SCORING_SECONDS",
    "StoreCollector",
    "WorkerCollector",
    "WorkerLoad",
    "expect_destinations",
    "observe_study_done",
    "observe_views",
    "register_certificates",
    "register_store",
    "register_worker",
    "set_model",
]
