"""The sender: C-STORE of results to every configured destination, with retries.

One thread per destination, so a node that is down never delays the others. Each round claims
the due deliveries, opens one association with a presentation context per SOP class, sends, and
records every answer as it comes. Statuses of the 0xA7xx family (out of resources), refused
associations, timeouts and connection errors are retried with exponential backoff; any other
failure status is final (FAILED with the peer's status) until `triage-admin retry`.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable, Sequence
from io import BytesIO
from pathlib import Path
from typing import TypeVar

from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.status import STATUS_WARNING, code_to_category

from triage import failpoints, metrics
from triage.config import Config, DestinationConfig
from triage.dicom.polling_socket import RequestorAE
from triage.logs import RepeatedFailure, get_logger, identity_values, withheld_text
from triage.store.direct_io import read_whole
from triage.store.outbox import Backoff, DueDelivery, Outbox
from triage.store.repository import Store
from triage.store.spool import Spool

log = get_logger("triage.sender")

#: Objects sent per association.
BATCH = 64

_Read = TypeVar("_Read")


def _is_transient(status: int) -> bool:
    """Out-of-resources answers (0xA7xx, and the general 0x0213 resource limitation) say
    "try later"; other failures will not go away."""
    return 0xA700 <= status <= 0xA7FF or status == 0x0213


#: PS3.7 C.5: "Duplicate SOP Instance", a failure by its class.
DUPLICATE_SOP_INSTANCE = 0x0111


def _stored(status: int) -> bool:
    """Success or a warning: the peer stored the object (0xB000–0xBFFF for storage, and the
    general warnings of PS3.7 Annex C, e.g. 0x0001 and 0x0107, that pynetdicom classes so),
    or holds it already. Our output UIDs derive from the result's content (output_identity):
    a PACS that refuses a duplicate holds this very object, sent before a crash, or by
    another daemon whose acknowledgement was lost; failed for good, the study would stay
    FAILED over an object the PACS has."""
    return status in (0x0000, DUPLICATE_SOP_INSTANCE) or code_to_category(status) == STATUS_WARNING


def client_tls_context(destination: DestinationConfig) -> ssl.SSLContext | None:
    """The TLS context towards *destination*, or ``None`` for plain DICOM."""
    if not destination.tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=destination.tls_ca or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if destination.tls_cert:
        context.load_cert_chain(destination.tls_cert, destination.tls_key)
    return context


class Sender:
    """Delivers outputs to the configured destinations until stopped."""

    def __init__(self, config: Config, store: Store, spool: Spool) -> None:
        self.config = config
        self.outbox = Outbox(store)
        self.spool = spool
        delivery = config.delivery
        self.backoff = Backoff(
            delivery.backoff_start_s,
            delivery.backoff_factor,
            delivery.backoff_max_s,
            delivery.max_attempts,
        )
        self._stop = threading.Event()
        self._wake = {d.name: threading.Event() for d in config.destinations}
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """One delivery thread per destination."""
        for destination in self.config.destinations:
            thread = threading.Thread(
                target=self._run, args=(destination,), name=f"sender-{destination.name}"
            )
            thread.daemon = True
            thread.start()
            self._threads.append(thread)

    def wake(self) -> None:
        """New outputs are ready: look now instead of at the next poll."""
        for event in self._wake.values():
            event.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the round in progress, send what is due in one more round, and stop;
        *timeout* bounds the whole wait (one per destination, in turn, went past systemd's
        TimeoutStopSec with a few of them)."""
        self._stop.set()
        self.wake()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def alive(self) -> bool:
        """True while every delivery thread runs."""
        return all(t.is_alive() for t in self._threads)

    def _run(self, destination: DestinationConfig) -> None:
        wake = self._wake[destination.name]
        failures = RepeatedFailure(
            log,
            "delivery_round_failed",
            "delivery_rounds_recovered",
            traceback=True,
            destination=destination.name,
        )
        while True:
            # One round begins after the stop: the worker stops before the sender, and the
            # results it finished in its grace, woken for or not, reach the PACS in it.
            last_round = self._stop.is_set()
            try:
                sent = self.deliver_once(destination)
                failures.succeeded()
            except Exception as exc:  # keep delivering; the next round retries
                failures.failed(str(exc))
                sent = 0
            if last_round:
                return
            if sent == 0:
                wake.wait(1.0)
                wake.clear()

    def deliver_once(self, destination: DestinationConfig) -> int:
        """Send what is due to *destination* over one association; returns objects attempted."""
        due = self.outbox.claim_due(destination.name, BATCH, self._lease_s())
        if not due:
            return 0
        self._send(destination, due)
        return len(due)

    def _lease_s(self) -> float:
        return self.config.delivery.timeout_s * 4 + 60

    def _send(self, destination: DestinationConfig, due: Sequence[DueDelivery]) -> None:
        ae = RequestorAE(ae_title=destination.calling_ae or self.config.dicom.ae_title)
        timeout = self.config.delivery.timeout_s
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        ae.connection_timeout = timeout
        ae.maximum_pdu_size = self.config.dicom.max_pdu_size
        # Only the file meta now, for the presentation contexts; each data set is read just
        # before its C-STORE. The whole batch read first held up to BATCH objects in memory
        # at once (a parametric map of a detector-sized DX is ~30 MB) per destination.
        metas: dict[int, FileMetaDataset] = {}
        for item in due:
            meta = self._read(destination, item, read_file_meta_info)
            if meta is not None:
                metas[item.delivery_id] = meta
        if not metas:
            return
        sop_classes: dict[str, set[str]] = {}
        for item in due:
            if item.delivery_id in metas:
                syntaxes = sop_classes.setdefault(item.sop_class_uid, set())
                syntax = metas[item.delivery_id].get("TransferSyntaxUID")
                syntaxes.update([str(syntax)] if syntax else [])
        for sop_class, syntaxes in sop_classes.items():
            ordered = [*sorted(syntaxes), ExplicitVRLittleEndian, ImplicitVRLittleEndian]
            ae.add_requested_context(sop_class, list(dict.fromkeys(ordered)))
        try:
            tls = client_tls_context(destination)
        except (OSError, ValueError) as exc:
            # A TLS file that stopped loading after start-up (often for a moment: a
            # certificate being rotated). Recorded as an attempt, with backoff, so the
            # reason shows and the deliveries fail only after their attempts.
            files = ", ".join(
                f"{key} {value}"
                for key, value in (
                    ("tls_ca", destination.tls_ca),
                    ("tls_cert", destination.tls_cert),
                    ("tls_key", destination.tls_key),
                )
                if value
            )
            reason = f"cannot set up TLS ({files}): {type(exc).__name__}: {exc}"
            for item in due:
                if item.delivery_id in metas:
                    self._failed(destination, item, reason)
            return
        try:
            assoc, tls_error = associate(
                ae, destination.host, destination.port, destination.ae_title, tls
            )
        except Exception as exc:
            assoc = None
            reason = f"cannot connect: {type(exc).__name__}: {exc}"
        else:
            reason = _association_failure(assoc, tls_error)
        if assoc is None or not assoc.is_established:
            # A permanent rejection (unknown calling AE …) or a peer that stores none of the
            # SOP classes offered needs an administrator, not retries.
            permanent = assoc is not None and (
                _rejected_permanently(assoc) or bool(_refused_sop_classes(assoc))
            )
            for item in due:
                if item.delivery_id in metas:
                    self._failed(destination, item, reason, permanent=permanent)
            return
        accepted = {str(context.abstract_syntax) for context in assoc.accepted_contexts}
        try:
            for message_id, item in enumerate(due, start=1):
                if item.delivery_id not in metas:
                    continue
                if not assoc.is_established:
                    # Not tried: an object that timed out (or a peer's abort) ended the
                    # association. Counted as attempts, a slow object made its whole batch
                    # use up max_attempts, and so its study went FAILED.
                    delay = self.backoff.delay(max(1, item.attempt))
                    self.outbox.not_tried(
                        item.delivery_id,
                        "association ended before it was sent",
                        delay,
                        item.lease_until,
                    )
                    continue
                if item.sop_class_uid not in accepted:
                    # Its configuration must change (and `triage-admin retry` then sends it).
                    self._failed(
                        destination,
                        item,
                        f"the peer does not store {_refusal(assoc, item.sop_class_uid)}",
                        permanent=True,
                    )
                    continue
                if not self.outbox.hold(item, self._lease_s()):
                    # Cancelled (`triage-admin cancel`: a wrong patient's results) or superseded
                    # since the batch was claimed: one C-STORE may take up to its timeout, and
                    # the rest of the batch must not follow it to the PACS. Or its lease ran
                    # out meanwhile and another daemon on the store claimed it: it sends it.
                    log.info(
                        "delivery_dropped",
                        study_uid=item.study_uid,
                        revision=item.revision,
                        destination=destination.name,
                        sop_instance_uid=item.sop_instance_uid,
                        reason="no longer pending, or claimed by another sender",
                    )
                    continue
                dataset = self._read(destination, item, _read_dataset)
                if dataset is not None:
                    self._store_one(assoc, destination, item, dataset, message_id)
        finally:
            if assoc.is_established:
                assoc.release()

    def _read(
        self,
        destination: DestinationConfig,
        item: DueDelivery,
        read: Callable[[Path], _Read],
    ) -> _Read | None:
        """*read* of *item*'s outbox file, or None with the failure recorded."""
        try:
            return read(self.spool.path(item.path))
        except FileNotFoundError as exc:  # a missing outbox file will not come back
            self._failed(destination, item, f"cannot read {item.path}: {exc}", permanent=True)
        except OSError as exc:
            # EIO, ESTALE, EMFILE: a network spool's moment or a short file table may
            # pass; the backoff's attempts decide, not the first read.
            self._failed(destination, item, f"cannot read {item.path}: {exc}")
        except Exception as exc:  # a broken outbox file will not heal
            self._failed(destination, item, f"cannot read {item.path}: {exc}", permanent=True)
        return None

    def _store_one(  # type: ignore[no-untyped-def]
        self, assoc, destination: DestinationConfig, item: DueDelivery, dataset, message_id: int
    ) -> None:
        started = time.monotonic()
        try:
            response = assoc.send_c_store(dataset, msg_id=message_id)
        except Exception as exc:
            self._failed(destination, item, f"C-STORE failed: {type(exc).__name__}: {exc}")
            return
        status = getattr(response, "Status", None)
        if status is None:
            waited = time.monotonic() - started
            # The timeout runs from the request's end (associate): a long transfer is no wait.
            sent_at = max(started, getattr(assoc, "request_sent_at", started))
            answer_wait = time.monotonic() - sent_at
            self._failed(destination, item, self._no_response(assoc, waited, answer_wait))
            return
        failpoints.hit("after_send")
        if _stored(status):
            finished = self.outbox.delivered(item.delivery_id, int(status))
            metrics.DELIVERY_ATTEMPTS.labels(destination.name, "delivered").inc()
            log.info(
                "object_delivered",
                study_uid=item.study_uid,
                revision=item.revision,
                kind=item.kind,
                sop_instance_uid=item.sop_instance_uid,
                destination=destination.name,
                status=f"0x{status:04X}",
            )
            if finished:
                log.info("study_done", study_uid=finished, revision=item.revision)
                metrics.observe_study_done(self.outbox.store, finished)
            return
        comment = str(getattr(response, "ErrorComment", "") or "")
        # A PACS may name the patient in its complaint ("Patient ID X exists with name Y"):
        # the reason is logged, stored and shown by triage-admin.
        comment = withheld_text(comment, identity_values([dataset]))
        reason = f"status 0x{status:04X}" + (f": {comment}" if comment else "")
        self._failed(
            destination, item, reason, status=int(status), permanent=not _is_transient(status)
        )

    def _no_response(  # type: ignore[no-untyped-def]
        self, assoc, waited: float, answer_wait: float
    ) -> str:
        """Why a C-STORE got no response: the delivery timeout ran out (*answer_wait*, since
        the request was sent), or the peer ended the association first, *waited* seconds
        after the C-STORE began (pynetdicom returns the same empty response for both)."""
        timeout = self.config.delivery.timeout_s
        if answer_wait >= timeout * 0.95:
            return f"no response to the C-STORE within {timeout:g} s ([delivery] timeout_s)"
        calling = assoc.requestor.ae_title
        # Orthanc, for one, accepts an association from an AE title it does not know and
        # aborts it at the first C-STORE: say where to look instead of "timeout".
        return (
            f"the peer ended the association during the C-STORE, after {waited:.1f} s and"
            " without a response (aborted, or closed the connection); a PACS may do this to"
            f" a calling AE title it does not know ({calling})"
        )

    def _failed(
        self,
        destination: DestinationConfig,
        item: DueDelivery,
        reason: str,
        *,
        status: int | None = None,
        permanent: bool = False,
    ) -> None:
        state = self.outbox.failed(
            item.delivery_id, reason, self.backoff, status=status, permanent=permanent
        )
        final = state is not None and state.value == "FAILED"
        if state is not None:  # None: the delivery was no longer pending (superseded)
            metrics.DELIVERY_ATTEMPTS.labels(destination.name, "failed" if final else "retry").inc()
        log.warning(
            "delivery_failed",
            study_uid=item.study_uid,
            revision=item.revision,
            kind=item.kind,
            destination=destination.name,
            attempt=item.attempt,
            error=reason,
            final=state is not None and state.value == "FAILED",
        )


def _read_dataset(path: Path) -> Dataset:
    """An outbox file's data set, read around the page cache as it was written
    (outputs.write_outputs)."""
    return dcmread(BytesIO(read_whole(path)))


def associate(  # type: ignore[no-untyped-def]
    ae: AE, host: str, port: int, called_ae: str, tls: ssl.SSLContext | None
):
    """``ae.associate``, with what pynetdicom leaves out for a requestor: (association, the
    TLS error that ended it or None).

    - pynetdicom clears the socket's timeout once connected, so a peer that stops inside a
      PDU held the sender thread (or `triage-admin echo`) until the peer closed, past every
      DIMSE and ACSE timeout: the socket's waits are bounded by ``ae.network_timeout``.
    - pynetdicom logs a TLS failure (an unknown CA, a name or date that does not fit, a
      peer that wants a client certificate) and reports the association as aborted: the
      delivery said "peer down or unreachable". The error is kept to say what it was.
    """
    tls_errors: list[OSError] = []
    if tls is not None:
        tls.sslsocket_class = _recording_ssl_socket(tls_errors)

    def bound_waits(event) -> None:  # type: ignore[no-untyped-def]
        sock = getattr(event.assoc.dul.socket, "socket", None)
        if sock is not None:
            sock.settimeout(event.assoc.network_timeout)

    assoc = ae.associate(
        host,
        port,
        ae_title=called_ae,
        tls_args=(tls, host) if tls else None,
        evt_handlers=[(evt.EVT_CONN_OPEN, bound_waits)],
    )
    if assoc.is_established:
        _time_responses_from_the_request_sent(assoc)
    return assoc, (tls_errors[0] if tls_errors else None)


def _time_responses_from_the_request_sent(assoc) -> None:  # type: ignore[no-untyped-def]
    """Make the DIMSE timeout count from a request's last PDU sent, not from its first.

    pynetdicom's ``send_msg`` only queues a request's PDUs for the DUL thread, and its wait
    for the response starts at once: a transfer longer than the timeout (a parametric map
    of a detector-sized DX is ~30 MB: a slow link, a PACS that writes as it reads) got "no
    response" at every attempt from a PACS taking every byte, and failed for good. Each
    send is bounded by the socket's timeout (``bound_waits``), and a failed one ends the
    DUL thread, so this wait ends too. ``request_sent_at`` records when it did.
    """
    dimse, dul = assoc.dimse, assoc.dul
    queue_request = dimse.send_msg

    def send_msg(primitive, context_id: int) -> None:  # type: ignore[no-untyped-def]
        queue_request(primitive, context_id)
        while not dul.to_provider_queue.empty() and dul.is_alive():
            time.sleep(0.001)
        assoc.request_sent_at = time.monotonic()

    dimse.send_msg = send_msg


class HandshakeCut(OSError):
    """Our TLS handshake ended without an answer in TLS: the peer closed the connection
    during it, or said nothing until the timeout (*timed_out*)."""

    def __init__(self, timed_out: bool) -> None:
        super().__init__("no answer" if timed_out else "connection closed")
        self.timed_out = timed_out


def _recording_ssl_socket(errors: list[OSError]) -> type[ssl.SSLSocket]:
    """An SSLSocket class that appends to *errors* each TLS error its handshake or reads
    raise (with TLS 1.3 a refused client certificate shows on the first read), and a
    :class:`HandshakeCut` for a connection that ended or went silent in the handshake: a
    peer that speaks plain DICOM on that port closes it at our ClientHello (DCMTK) or waits
    for a PDU, and that was reported as a peer down or unreachable."""

    class RecordingSSLSocket(ssl.SSLSocket):
        def do_handshake(self, block=False):  # type: ignore[no-untyped-def]
            # Called by connect() once the TCP connection is made: what fails here is TLS.
            try:
                return super().do_handshake(block)
            except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError):
                errors.append(HandshakeCut(timed_out=False))
                raise
            except TimeoutError:
                errors.append(HandshakeCut(timed_out=True))
                raise
            except ssl.SSLError as exc:
                errors.append(exc)
                raise

        def recv(self, buflen=1024, flags=0):  # type: ignore[no-untyped-def]
            try:
                return super().recv(buflen, flags)
            except ssl.SSLError as exc:
                errors.append(exc)
                raise

        def recv_into(self, buffer, nbytes=None, flags=0):  # type: ignore[no-untyped-def]
            try:
                return super().recv_into(buffer, nbytes, flags)
            except ssl.SSLError as exc:
                errors.append(exc)
                raise

    return RecordingSSLSocket


def tls_failure(exc: OSError) -> str:
    """What a TLS error says, for an operator: the verification message of a certificate
    that failed, a handshake the peer did not answer in TLS, else OpenSSL's reason."""
    plain = "is the peer's port plain DICOM, without TLS?"
    if isinstance(exc, HandshakeCut):
        what = "did not answer" if exc.timed_out else "closed the connection during"
        return f"TLS: the peer {what} the TLS handshake: {plain}"
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"TLS: the peer's certificate failed verification: {exc.verify_message}"
    reason = getattr(exc, "reason", None) or str(exc)
    if reason == "WRONG_VERSION_NUMBER":  # the peer answered, but not in TLS
        return f"TLS: wrong version number (the answer was not TLS): {plain}"
    return f"TLS: {reason.replace('_', ' ').lower()}"


def rejection(assoc) -> A_ASSOCIATE | None:  # type: ignore[no-untyped-def]
    """The peer's A-ASSOCIATE-RJ for a failed association request, or None.

    pynetdicom can report a rejected association as aborted: when the peer closes the
    connection right after its A-ASSOCIATE-RJ (DCMTK does), the requestor may find the socket
    closed before it takes the RJ primitive from the DUL's queue, and aborts
    (``acse._negotiate_as_requestor`` checks the socket first; ~1 in 10 attempts against
    ``storescp --refuse`` here). The primitive is still in that queue, so look there too.
    """
    if assoc.is_rejected and assoc.acceptor.primitive is not None:
        return assoc.acceptor.primitive
    if assoc.is_established:
        return None
    pending = getattr(getattr(getattr(assoc, "dul", None), "to_user_queue", None), "queue", ())
    for primitive in list(pending):
        if isinstance(primitive, A_ASSOCIATE) and primitive.result in (0x01, 0x02):
            return primitive
    return None


#: A-ASSOCIATE-RJ source: service provider, presentation related (PS3.8 9.3.4).
_PRESENTATION_PROVIDER = 0x03


def _rejected_permanently(assoc) -> bool:  # type: ignore[no-untyped-def]
    """True for a rejection no retry gets past. Congestion and local limits (the
    presentation provider's only reasons) pass whatever the result says: DCMTK's
    ``storescp --fork`` and ``dcmqrscp`` reject "permanently, temporary congestion" when they
    cannot fork a process, and such a load failed every delivery in a batch for good."""
    primitive = rejection(assoc)
    return (
        primitive is not None
        and primitive.result == 0x01
        and primitive.result_source != _PRESENTATION_PROVIDER
    )


_REJECT_DIAGNOSTICS = {
    (0x01, 0x01): "no reason given",
    (0x01, 0x02): "application context name not supported",
    (0x01, 0x03): "calling AE title not recognised",
    (0x01, 0x07): "called AE title not recognised",
    (0x02, 0x01): "no reason given (ACSE)",
    (0x02, 0x02): "protocol version not supported",
    (0x03, 0x01): "temporary congestion",
    (0x03, 0x02): "local limit exceeded",
}


def _sop_class_name(uid: str) -> str:
    name = UID(uid).name
    return name if name and name != uid else uid


#: A-ASSOCIATE-AC presentation context results (PS3.8 9.3.3.2).
_TRANSFER_SYNTAXES_NOT_SUPPORTED = 0x04


def _refusal(assoc, sop_class: str) -> str:  # type: ignore[no-untyped-def]
    """*sop_class*'s name, and why the peer refused it: the class itself, or only every
    transfer syntax offered (the setting to change on the PACS is another)."""
    name = _sop_class_name(sop_class)
    for context in assoc.rejected_contexts:
        if str(context.abstract_syntax) != sop_class:
            continue
        if context.result == _TRANSFER_SYNTAXES_NOT_SUPPORTED:
            offered = ", ".join(_sop_class_name(str(t)) for t in context.transfer_syntax)
            return f"{name} in any transfer syntax offered ({offered})"
        return f"{name} (it does not accept the SOP class)"
    return f"{name} (it accepted no presentation context for it)"


def _refused_sop_classes(assoc) -> list[str]:  # type: ignore[no-untyped-def]
    """Each SOP class offered and why it was refused, when the peer accepted none of them
    (pynetdicom then aborts the association itself: it is no abort of the peer's), else []."""
    if assoc.is_established or assoc.accepted_contexts:
        return []
    classes = sorted({str(c.abstract_syntax) for c in assoc.rejected_contexts})
    return [_refusal(assoc, sop_class) for sop_class in classes]


def _association_failure(  # type: ignore[no-untyped-def]
    assoc, tls_error: OSError | None = None
) -> str:
    if assoc.is_established:
        return ""
    if tls_error is not None:
        return tls_failure(tls_error)
    refused = _refused_sop_classes(assoc)
    if refused:
        return f"the peer stores none of the SOP classes offered: {'; '.join(refused)}"
    primitive = rejection(assoc)
    if primitive is not None:
        kind = "permanently" if primitive.result == 0x01 else "transiently"
        why = _REJECT_DIAGNOSTICS.get(
            (primitive.result_source, primitive.diagnostic),
            f"diagnostic {primitive.diagnostic}",
        )
        return f"association rejected {kind}: {why}"
    if assoc.is_rejected:
        return "association rejected"
    if assoc.is_aborted and assoc.acceptor.primitive is not None:
        return "association aborted by the peer"
    # pynetdicom reports a refused or timed-out connection as an abort without any answer,
    # and so a peer that takes the connection but never answers the association request.
    return "cannot connect, or no answer to the association request (peer down or unreachable)"
