"""The DICOM listener: C-ECHO and C-STORE, durable before it says success.

Each association runs in its own pynetdicom thread. For each instance the thread validates the
header, writes the file to the spool (temp, fsync, rename, fsync of the folder), records it in
the store and only then answers. Pixels are never decoded here and nothing else slow runs here.
Every failure becomes a DIMSE status with an ErrorComment; no exception reaches pynetdicom.

A study's quiet period counts from its last recorded instance; while an association is still
sending a data set, the study of the last instance it stored is kept RECEIVING (see
:meth:`Listener._keep_studies_receiving`), so the quiet period starts when the sender stops.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom import _config as _pynetdicom_config
from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT, A_RELEASE
from pynetdicom.transport import ThreadedAssociationServer

from triage.config import DicomConfig
from triage.dicom import fast_commands, fast_receive, prompt_reactors
from triage.dicom.fast_receive import FastRequestHandler, install_spool_temp_files, write_error
from triage.dicom.sop import (
    ACKNOWLEDGED_NOT_STORED,
    DEFAULT_STORAGE_CLASSES,
    TRANSFER_SYNTAXES,
    VERIFICATION,
    Status,
)
from triage.dicom.validation import Accepted, Rejected, check_instance
from triage.logs import RepeatedFailure, get_logger
from triage.store.models import AssociationOutcome
from triage.store.repository import InstanceMeta, Store
from triage.store.spool import Spool, SpoolError

log = get_logger("triage.listener")

# A-ASSOCIATE-RJ diagnostics pynetdicom or we send (PS3.8 9.3.4), for the audit row.
_REJECT_REASONS = {
    (0x01, 0x03): "calling AE title not recognised",
    (0x01, 0x07): "called AE title not recognised",
    (0x03, 0x02): "local limit exceeded (maximum associations)",
}


class PeerPolicy:
    """The calling-AE allow list: ``AE`` (from any host) or ``AE@host``. Empty allows anyone."""

    def __init__(self, entries: tuple[str, ...]) -> None:
        self._any_host: set[str] = set()
        self._hosts: dict[str, set[str]] = {}
        for entry in entries:
            ae, _, host = entry.partition("@")
            if host:
                self._hosts.setdefault(ae.strip(), set()).update(_resolve(host))
            else:
                self._any_host.add(ae.strip())
        self.open = not entries

    def allows(self, calling_ae: str, host: str) -> bool:
        """True if *calling_ae* may associate from *host*."""
        if self.open:
            return True
        ae = calling_ae.strip()
        return ae in self._any_host or _unmapped(host) in self._hosts.get(ae, set())


def _unmapped(host: str) -> str:
    """*host* with an IPv4-mapped IPv6 address as plain IPv4: a listener bound to ``::``
    sees an IPv4 peer as ``::ffff:10.0.0.5``, which ``AE@10.0.0.5`` would never match."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped) if mapped is not None else host


def _resolve(host: str) -> set[str]:
    """The addresses of *host* (itself when it is an address or cannot be resolved now)."""
    try:
        return {info[4][0] for info in socket.getaddrinfo(host, None)} | {host}
    except OSError:
        return {host}


def make_tls_context(config: DicomConfig) -> ssl.SSLContext | None:
    """The server TLS context, or ``None`` when TLS is off (TLS 1.2 or newer)."""
    if not config.tls:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.tls_cert, config.tls_key)
    if config.tls_ca:
        context.load_verify_locations(config.tls_ca)
    if config.tls_verify_client:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


_HANDSHAKES_LOCK = threading.Lock()


class _Server(ThreadedAssociationServer):
    """pynetdicom's server plus SO_REUSEPORT, and the TLS handshake off the accept thread."""

    reuse_port = False
    #: Called with (peer host, peer port, reason) when a TLS peer's handshake is refused.
    on_handshake_refused: Callable[[str, int, str], None] | None = None
    #: Called at every turn of the accept loop (at least every poll interval): the
    #: listener process's heartbeat, by which its daemon knows that it still accepts.
    on_tick: Callable[[], None] | None = None

    def service_actions(self) -> None:
        super().service_actions()
        if self.on_tick is not None:
            self.on_tick()

    def server_bind(self) -> None:
        if self.reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, Any]:
        # pynetdicom wraps with the handshake in the accept loop: one slow or hostile client
        # would stall every other peer. Wrap here, handshake in the connection's own thread.
        client, address = self.socket.accept()
        # An accepted socket has no timeout: a peer that stops sending inside a PDU (a dead
        # link that sends no RST, a scanner) would hold its thread and an association slot
        # for ever, and enough of them lock every modality out.
        client.settimeout(self.ae.network_timeout)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address

    def finish_request(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            request.settimeout(self.ae.network_timeout)
            with _HANDSHAKES_LOCK:
                handshaking = self.__dict__.setdefault("_handshaking", set())
                if self.__dict__.get("_closing"):
                    self.shutdown_request(request)
                    return
                handshaking.add(request)
            try:
                request.do_handshake()
            except (OSError, ssl.SSLError) as exc:
                host = _unmapped(client_address[0])
                log.warning("tls_handshake_failed", peer_host=host, error=str(exc))
                self.shutdown_request(request)
                refused = handshake_refusal(exc)
                if refused and self.on_handshake_refused is not None:
                    self.on_handshake_refused(host, client_address[1], refused)
                return
            finally:
                with _HANDSHAKES_LOCK:
                    handshaking.discard(request)
        super().finish_request(request, client_address)

    def abandon_handshakes(self) -> None:
        """End the TLS handshakes under way, and any that would begin: a peer stalled in
        one held its thread until the network timeout, and pynetdicom's shutdown joins
        every such thread, so the stop waited, past its grace, and the listener was
        killed with its associations never aborted or closed out."""
        with _HANDSHAKES_LOCK:
            self.__dict__["_closing"] = True
            pending = list(self.__dict__.get("_handshaking", ()))
        for sock in pending:
            # The plain socket's shutdown: SSLSocket's own would clear its SSL object under
            # the thread that is using it.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)


def handshake_refusal(exc: BaseException) -> str:
    """Why a TLS handshake failed, for the audit, or "" when it was no attempt at one.

    A peer whose certificate did not verify, that offered no certificate or an old protocol,
    that spoke plain DICOM to the TLS port or that refused our certificate is a
    misconfigured modality or a probe: each gets a REJECTED audit row. A connection that
    closed or timed out before a word of TLS (a port check, a load balancer's probe) is not
    an association attempt and gets none, or their rows would bury the real ones.
    """
    if not isinstance(exc, ssl.SSLError) or isinstance(
        exc, ssl.SSLEOFError | ssl.SSLZeroReturnError | ssl.SSLWantReadError
    ):
        return ""
    detail = getattr(exc, "verify_message", None) or (exc.reason or "").replace("_", " ")
    return f"TLS handshake failed: {(detail or str(exc)).lower()}"


@dataclass
class _AssociationTally:
    """Counts for one association's audit row."""

    record_id: int | None = None
    stored: int = 0
    duplicate: int = 0
    failed: int = 0
    bytes_stored: int = 0
    echoes: int = 0
    reason: str = ""
    studies: set[str] = field(default_factory=set)
    #: The association-ending reply we queued: "rejection", "release" or "abort".
    sent: str = ""
    #: The association itself, for the thread that keeps its study receiving.
    assoc: Any = field(default=None, repr=False)
    #: The study of the last instance the association stored (or held already): the one
    #: the data set it sends next most likely belongs to (the command does not name it).
    current_study: str = ""
    #: When (time.monotonic()) that study's quiet period last restarted on its account.
    touched_at: float = 0.0
    #: Set once the audit row was closed with it (see Listener._on_closed).
    outcome: AssociationOutcome | None = None
    #: Serialises the audit row's writes: the close's and a late C-STORE's.
    lock: threading.Lock = field(default_factory=threading.Lock)


class Listener:
    """A pynetdicom AE serving C-ECHO and C-STORE into a spool and a store."""

    def __init__(
        self,
        config: DicomConfig,
        store: Store,
        spool: Spool,
        reuse_port: bool = False,
        quiet_period_s: float = 0.0,
        temp_prefix: str = "tmp",
        on_tick: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.spool = spool
        self.reuse_port = reuse_port
        #: How the names of the data sets being received begin (see install_spool_temp_files).
        self.temp_prefix = temp_prefix
        #: Called at every turn of the accept loop (see _Server.on_tick).
        self.on_tick = on_tick
        #: ``[study] quiet_period_s``; 0 (nothing can hold a study then) keeps none receiving.
        self.quiet_period_s = quiet_period_s
        self._keeper_stop = threading.Event()
        self.policy = PeerPolicy(config.allowed_peers)
        self.storage_classes = frozenset(DEFAULT_STORAGE_CLASSES) | frozenset(
            config.extra_sop_classes
        )
        self._server: _Server | None = None
        self._tallies: dict[int, _AssociationTally] = {}
        self._lock = threading.Lock()
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.config.ae_title)
        ae.maximum_associations = self.config.max_associations
        ae.maximum_pdu_size = self.config.max_pdu_size
        ae.network_timeout = self.config.network_timeout_s
        ae.acse_timeout = self.config.acse_timeout_s
        ae.dimse_timeout = self.config.dimse_timeout_s
        ae.require_called_aet = self.config.require_called_ae
        ae.add_supported_context(VERIFICATION)
        _register_storage_classes(self.storage_classes)
        for sop_class in sorted(self.storage_classes | set(ACKNOWLEDGED_NOT_STORED)):
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        return ae

    @property
    def port(self) -> int:
        """The bound TCP port (useful when the config asked for port 0)."""
        assert self._server is not None
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind and serve in a background thread. Raises OSError when the port is taken.

        The listener owns its process: it switches pynetdicom to writing each received data
        set straight to a file in the spool's temp folder as its fragments arrive (no 10 MB
        buffers; the disk write overlaps the transfer), so an accepted file only needs fsync
        and a link to become durable (see fast_receive).
        """
        _pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True
        install_spool_temp_files(self.spool.temp_dir, self.temp_prefix)
        prompt_reactors.install()
        fast_commands.install()
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACSE_SENT, self._on_acse_sent),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        _Server.reuse_port = self.reuse_port
        server = self.ae.make_server(
            (self.config.bind, self.config.port),
            ae_title=self.config.ae_title,
            ssl_context=make_tls_context(self.config),
            evt_handlers=handlers,
            server_class=_Server,
            request_handler=FastRequestHandler,
        )
        server.on_handshake_refused = self._on_handshake_refused
        server.on_tick = self.on_tick
        self._server = server
        self.ae._servers.append(server)
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="dicom-accept"
        )
        thread.daemon = True
        thread.start()
        if self.quiet_period_s > 0:
            threading.Thread(
                target=self._keep_studies_receiving, name="study-keeper", daemon=True
            ).start()

    def active_associations(self) -> int:
        """Associations in progress on this listener."""
        return len(self._server.active_associations) if self._server else 0

    def close_listening_socket(self) -> None:
        """Stop accepting at once, without waiting for the accept loop (the daemon is gone)."""
        server = self._server
        if server is None or server.socket is None:
            return
        with contextlib.suppress(OSError):
            server.socket.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            server.socket.close()

    def stop(self, grace_s: float) -> None:
        """Stop accepting, let associations in flight finish for *grace_s*, then abort them."""
        server = self._server
        if server is None:
            return
        server.abandon_handshakes()
        server.shutdown()  # stops the accept loop and closes the listening socket
        deadline = time.monotonic() + grace_s
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        leftovers = server.active_associations
        for assoc in leftovers:
            assoc.abort()
        if leftovers:
            log.warning("associations_aborted_at_shutdown", count=len(leftovers))
        # Only now: an association finishing its transfer during the grace keeps its study.
        self._keeper_stop.set()
        self._server = None

    # --- association events -------------------------------------------------------------

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        request = assoc.requestor.primitive
        calling = str(request.calling_ae_title).strip()
        called = str(request.called_ae_title).strip()
        # As the audit, the log and the allow list name it (not ::ffff:10.0.0.5 on "::").
        host, port = _unmapped(assoc.requestor.address), assoc.requestor.port
        tally = _AssociationTally(assoc=assoc)
        with self._lock:
            self._tallies[id(assoc)] = tally
        try:
            tally.record_id = self.store.open_association(
                calling, called, host, port, self._server.ssl_context is not None, os.getpid()
            )
        except Exception as exc:
            log.error("association_audit_failed", error=_one_line(exc))
        if not self.policy.allows(calling, host):
            tally.reason = "calling AE title not allowed from this host"
            log.warning(
                "association_rejected", calling_ae=calling, peer_host=host, reason=tally.reason
            )
            assoc.acse.send_reject(0x01, 0x01, 0x03)
            assoc.kill()

    def _on_handshake_refused(self, host: str, port: int, reason: str) -> None:
        """A REJECTED audit row for a TLS peer that never reached A-ASSOCIATE-RQ: whoever
        reads the audit sees the modality with the expired certificate, not silence."""
        try:
            self.store.record_refused_connection(
                self.config.ae_title, host, port, os.getpid(), reason
            )
        except Exception as exc:
            log.error("association_audit_failed", error=_one_line(exc))

    def _on_echo(self, event: evt.Event) -> int:
        tally = self._tallies.get(id(event.assoc))
        if tally:
            tally.echoes += 1
        return Status.SUCCESS

    def _on_store(self, event: evt.Event) -> Dataset:
        with self._lock:
            tally = (
                self._tallies.get(id(event.assoc))
                or getattr(event.assoc, "_triage_closed_tally", None)
                or _AssociationTally()
            )
        try:
            status, reason = self._store(event, tally)
        except Exception as exc:  # the listener must survive anything
            log.exception("store_handler_error", error=_one_line(exc))
            status, reason = Status.STORE_UNAVAILABLE, "internal error; retry later"
        if status != Status.SUCCESS:
            tally.failed += 1
        with tally.lock:
            if tally.outcome is not None:
                # The peer went away while this C-STORE was handled (see _on_closed): the
                # row was closed without it, so write it again with it.
                log.info(
                    "association_audit_updated",
                    calling_ae=event.assoc.requestor.ae_title,
                    stored=tally.stored,
                    duplicate=tally.duplicate,
                    failed=tally.failed,
                )
                self._close_audit_row(tally)
        response = Dataset()
        response.Status = status
        if reason:
            response.ErrorComment = error_comment(reason)
        return response

    def _store(self, event: evt.Event, tally: _AssociationTally) -> tuple[int, str]:
        request = event.request
        # pynetdicom wrote the data set, as it arrived, to a Part 10 file in the spool's temp
        # folder (see start()); it deletes that name after we answer.
        received = event.dataset_path
        if received is None:  # a C-STORE request whose command says it carries no data set
            return Status.UNREADABLE, "C-STORE request without a data set"
        failed_write = write_error(received)
        if failed_write is not None:  # the disk filled (or failed) while it arrived
            log.error(
                "spool_write_failed",
                error=f"{failed_write.strerror or failed_write}",
                calling_ae=event.assoc.requestor.ae_title,
            )
            return Status.OUT_OF_RESOURCES, "cannot write to the spool"
        if str(request.AffectedSOPClassUID) != str(event.context.abstract_syntax):
            log.warning(
                "instance_rejected",
                status=f"0x{Status.DATASET_MISMATCH:04X}",
                reason="SOP class differs from the presentation context's",
                calling_ae=event.assoc.requestor.ae_title,
            )
            return Status.DATASET_MISMATCH, "SOP class differs from the presentation context"
        if (
            str(request.AffectedSOPClassUID) in ACKNOWLEDGED_NOT_STORED
            and str(request.AffectedSOPClassUID) not in self.storage_classes
        ):
            # A report, a presentation state, our own results: part of the study the PACS
            # sends, nothing to score.
            tally.duplicate += 1
            log.info(
                "non_view_ignored",
                sop_class_uid=str(request.AffectedSOPClassUID),
                calling_ae=event.assoc.requestor.ae_title,
            )
            return Status.SUCCESS, ""
        verdict = check_instance(
            received,
            str(request.AffectedSOPClassUID),
            str(request.AffectedSOPInstanceUID),
            self.storage_classes,
        )
        if isinstance(verdict, Rejected):
            log.warning(
                "instance_rejected",
                status=f"0x{verdict.status:04X}",
                reason=verdict.reason,
                calling_ae=event.assoc.requestor.ae_title,
            )
            return verdict.status, verdict.reason
        assert isinstance(verdict, Accepted)
        bound = log.bind(study_uid=verdict.study_uid, sop_instance_uid=verdict.sop_instance_uid)
        if verdict.own_output:
            # A PACS routing the whole study back to us: acknowledge, but never as a new view
            # (it would re-open the study and loop).
            tally.duplicate += 1
            bound.info("own_output_ignored")
            return Status.SUCCESS, ""
        if not self.spool.has_room():
            held = self.store.held_path(verdict.sop_instance_uid, verdict.study_uid)
            if held is not None and self.spool.holds(held):
                tally.duplicate += 1  # already held: still a success, even on a full disk
                return Status.SUCCESS, ""
            bound.error("spool_below_free_space_floor", min_free_bytes=self.spool.min_free_bytes)
            return Status.OUT_OF_RESOURCES, "spool below free-space floor"
        relative = self.spool.relative_path(verdict.study_uid, verdict.sop_instance_uid)
        try:
            size = self.spool.adopt(received, relative)
        except SpoolError as exc:
            bound.error("spool_write_failed", error=str(exc))
            return Status.OUT_OF_RESOURCES, "cannot write to the spool"
        try:
            result = self.store.record_instance(
                InstanceMeta(
                    study_uid=verdict.study_uid,
                    series_uid=verdict.series_uid,
                    sop_instance_uid=verdict.sop_instance_uid,
                    sop_class_uid=verdict.sop_class_uid,
                    transfer_syntax_uid=str(event.context.transfer_syntax),
                    modality=verdict.modality,
                    path=relative,
                    size_bytes=size,
                ),
                tally.record_id,
            )
        except Exception as exc:
            bound.error("store_record_failed", error=_one_line(exc))
            # Not acknowledged: the name linked above goes. Left with no row, it held PHI
            # that no row named (PostgreSQL), or the spool recovery recorded what the PACS
            # was told was refused (SQLite). It stays if it is an earlier copy of this
            # instance (another inode), acknowledged then, or if a row names it after all:
            # another association's copy of the instance, acknowledged meanwhile, found this
            # file and kept it, or this commit went through and only its answer was lost.
            # When the store does not answer that, no row is taken to name it: if one does,
            # the PACS's next attempt is a duplicate that links the file again.
            with contextlib.suppress(OSError):
                if os.path.samefile(
                    received, self.spool.path(relative)
                ) and not self._named_by_a_row(verdict.sop_instance_uid, relative):
                    self.spool.remove(relative)
            return Status.STORE_UNAVAILABLE, "store unavailable; retry later"
        if result.moved_from is not None:
            # Its copy in the cancelled study it came from is no row's any more.
            self.spool.remove(result.moved_from)
            bound.warning("instance_moved_from_cancelled_study", moved_from=result.moved_from_study)
        if result.duplicate:
            tally.duplicate += 1
            if result.study_uid == verdict.study_uid:
                # The sender's next data set is likely of this study too: if it is still
                # receiving (another association's), hold it while that one arrives.
                tally.current_study = verdict.study_uid
            else:
                # Held already, in another study: the name linked above is no row's, and the
                # spool recovery would take it for a new study once that one is purged.
                self.spool.remove(relative)
                bound.warning("duplicate_in_another_study", stored_in=result.study_uid)
            return Status.SUCCESS, ""
        if not self.spool.holds(relative):
            # A purge of this study's old revision, committed while the row was being
            # written, removed the file adopted above (the PACS re-sent an instance it had
            # sent before): link it again from the received file, still there.
            try:
                self.spool.adopt(received, relative)
            except SpoolError as exc:
                bound.error("spool_write_failed", error=str(exc))
                return Status.OUT_OF_RESOURCES, "cannot write to the spool"
            bound.info("instance_restored_after_purge")
        tally.stored += 1
        tally.bytes_stored += size
        tally.studies.add(verdict.study_uid)
        # record_instance restarted the study's quiet period: nothing for the keeper to do
        # until a data set takes longer than a third of it (never, on a fast transfer).
        tally.current_study, tally.touched_at = verdict.study_uid, time.monotonic()
        if result.study_change == "opened":
            bound.info("study_opened", revision=result.revision)
        elif result.study_change == "reopened":
            bound.info("study_reopened", revision=result.revision)
        bound.debug("instance_stored", size_bytes=size, revision=result.revision)
        return Status.SUCCESS, ""

    def _keep_studies_receiving(self) -> None:
        """Until :meth:`stop`: keep RECEIVING the study of each association that is in the
        middle of a DIMSE message (a C-STORE's command or data set) and whose study's quiet
        period last restarted a third of that period ago or more.

        The quiet period counts from the last *recorded* instance: a view slower to arrive
        than the period (50 MB over a slow teleradiology link, or many views over a slow
        WAN) let the study be queued and scored while its association was still sending it,
        and the rest opened a new revision, scored and sent again. Here the association's
        last study is stamped again (one UPDATE for all of this process's, see
        :meth:`Store.keep_receiving`) while it receives, so the period starts only when it
        goes quiet. The thread looks twice per third of the period: a study is at most half
        a quiet period old while its data keep coming. An association waiting between
        messages (or idle, held open) holds nothing; one whose peer stalls mid-message holds
        its study until the network timeout ends it. Only the last study is held, not every
        one the association carried: a router that forwards study after study on one
        long-lived association would otherwise hold them all until it let go. Nothing of
        this runs per PDU or per instance: a fast transfer records its instances more often
        than a third of the period and is never stamped here.
        """
        hold_s = self.quiet_period_s / 3
        failures = RepeatedFailure(log, "keep_receiving_failed", "keep_receiving_recovered")
        while not self._keeper_stop.wait(max(hold_s / 2, 0.05)):
            now = time.monotonic()
            with self._lock:
                tallies = list(self._tallies.values())
            studies = set()
            for tally in tallies:
                if not tally.current_study or now - tally.touched_at < hold_s:
                    continue
                # pynetdicom's message being decoded, None between messages. Read without
                # its thread's lock: a stale answer only moves the stamp by one look.
                if getattr(getattr(tally.assoc, "dimse", None), "message", None) is None:
                    continue
                tally.touched_at = now
                studies.add(tally.current_study)
            if not studies:
                continue
            try:
                kept = self.store.keep_receiving(studies)
            except Exception as exc:  # the store down: the next instance's answer says so
                failures.failed(_one_line(exc))
                continue
            failures.succeeded()
            log.debug("studies_kept_receiving", studies=len(studies), receiving=kept)

    def _named_by_a_row(self, sop_instance_uid: str, relative: str) -> bool:
        """Whether the store records *relative* as this instance's file; False when the
        store does not answer."""
        try:
            return self.store.instance_path(sop_instance_uid) == relative
        except Exception:
            return False

    def _on_acse_sent(self, event: evt.Event) -> None:
        tally = self._tallies.get(id(event.assoc))
        if tally is not None:
            tally.sent = _acse_reply_kind(event.primitive) or tally.sent

    def _on_closed(self, event: evt.Event) -> None:
        assoc = event.assoc
        _discard_partial_data_set(assoc)
        with self._lock:
            tally = self._tallies.pop(id(assoc), None)
            # This runs on the DUL thread. A C-STORE received in full just before the peer
            # went away is still handled after it, on the association thread: _on_store
            # finds the tally here and completes the audit row with its instance.
            assoc._triage_closed_tally = tally
        if tally is None:
            return
        # pynetdicom sets is_rejected / is_released just *after* it queues the reply, and the
        # DUL thread may send it and see the peer hang up first: what we sent decides.
        if assoc.is_rejected or tally.sent == "rejection":
            outcome = AssociationOutcome.REJECTED
            primitive = assoc.acceptor.primitive
            if not tally.reason and primitive is not None:
                key = (primitive.result_source, primitive.diagnostic)
                tally.reason = _REJECT_REASONS.get(key, f"rejected {key}")
        elif assoc.is_aborted or tally.sent == "abort":
            outcome = AssociationOutcome.ABORTED
        elif assoc.is_released or tally.sent == "release":
            outcome = AssociationOutcome.RELEASED
        else:
            outcome = AssociationOutcome.ABORTED
            tally.reason = tally.reason or "connection closed without release"
        log.info(
            "association_ended",
            calling_ae=assoc.requestor.ae_title,
            peer_host=_unmapped(assoc.requestor.address),
            outcome=outcome.value,
            stored=tally.stored,
            duplicate=tally.duplicate,
            failed=tally.failed,
            studies=len(tally.studies),
            reason=tally.reason or None,
        )
        with tally.lock:
            tally.outcome = outcome
            self._close_audit_row(tally)

    def _close_audit_row(self, tally: _AssociationTally) -> None:
        """Write *tally*'s counts and outcome to its audit row (called with its lock)."""
        if tally.record_id is None or tally.outcome is None:
            return
        try:
            self.store.close_association(
                tally.record_id,
                tally.outcome,
                stored=tally.stored,
                duplicate=tally.duplicate,
                failed=tally.failed,
                bytes_stored=tally.bytes_stored,
                echoes=tally.echoes,
                reason=tally.reason,
            )
        except Exception as exc:
            log.error("association_audit_failed", error=_one_line(exc))


def error_comment(reason: str) -> str:
    """*reason* as an ErrorComment (LO: at most 64 characters, default repertoire): a longer
    one cut at a word and marked with "...", not mid-word ("Explicit VR Little En")."""
    text = reason.encode("ascii", "replace").decode("ascii")
    if len(text) <= 64:
        return text
    cut = text[:61].rsplit(" ", 1)[0].rstrip(" ,;:(")
    return f"{cut}..."


def _register_storage_classes(uids: frozenset[str]) -> None:
    """Make pynetdicom serve C-STORE under SOP classes it does not know (private or newer
    ones from ``extra_sop_classes``): it picks the service from the SOP class, and for an
    unknown one aborts the association on every C-STORE."""
    from pynetdicom.service_class import ServiceClass, StorageServiceClass
    from pynetdicom.sop_class import register_uid, uid_to_service_class

    for uid in sorted(uids):
        if uid_to_service_class(uid) is ServiceClass:
            register_uid(uid, "TriageStorage_" + uid.replace(".", "_"), StorageServiceClass)
    fast_receive.forget_service_classes()


def _acse_reply_kind(primitive: Any) -> str:
    """ "rejection", "release" (our A-RELEASE response), "abort" or "" for other primitives."""
    if isinstance(primitive, A_ASSOCIATE) and primitive.result in (0x01, 0x02):
        return "rejection"
    if isinstance(primitive, A_RELEASE) and primitive.result == "affirmative":
        return "release"
    if isinstance(primitive, A_ABORT | A_P_ABORT):
        return "abort"
    return ""


def _one_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _discard_partial_data_set(assoc: Any) -> None:
    """Delete the spool temp file of a data set the peer stopped sending (abort, lost
    connection): it was never acknowledged, and nothing else would remove it before the
    next start."""
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    partial = getattr(message, "_data_set_file", None)
    if partial is None:
        return
    with contextlib.suppress(OSError):
        partial.close()
    with contextlib.suppress(OSError):
        os.unlink(partial.name)
    log.info("partial_data_set_discarded", calling_ae=assoc.requestor.ae_title)
