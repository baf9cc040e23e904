"""The listener's reactor naps end as soon as there is work (triage.dicom.prompt_reactors).

The waits are tested with long timeouts that a wake-up must cut short: these check that a
wake-up arrives, not how fast (speed is bench/ingest's job). The DCMTK tests in
test_listener.py run every association through these waits.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from types import SimpleNamespace

import pytest
from pynetdicom import association as association_module
from pynetdicom import dul as dul_module

from triage.dicom import prompt_reactors
from triage.dicom.prompt_reactors import NAP_S, _DulWaiter, _event_waiter, _ReactorTime

LONG_S = 30.0


def _in_thread(target) -> tuple[threading.Thread, list[float]]:  # type: ignore[no-untyped-def]
    took: list[float] = []

    def run() -> None:
        start = time.monotonic()
        target()
        took.append(time.monotonic() - start)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, took


def _fake_dul(sock: socket.socket | None) -> SimpleNamespace:
    transport = SimpleNamespace(socket=sock, _is_connected=sock is not None)
    return SimpleNamespace(socket=transport)


def test_dul_wait_ends_when_another_thread_wakes_it() -> None:
    waiter = _DulWaiter(_fake_dul(None))
    thread, took = _in_thread(lambda: waiter.wait(LONG_S))
    time.sleep(0.05)
    waiter.wake()
    thread.join(LONG_S)
    assert took and took[0] < LONG_S / 2
    # The wake-up was consumed: the next wait runs its course.
    start = time.monotonic()
    waiter.wait(0.05)
    assert time.monotonic() - start >= 0.04


def test_dul_wait_ends_when_the_peer_sends() -> None:
    ours, peer = socket.socketpair()
    with ours, peer:
        waiter = _DulWaiter(_fake_dul(ours))
        thread, took = _in_thread(lambda: waiter.wait(LONG_S))
        time.sleep(0.05)
        peer.sendall(b"\x04")
        thread.join(LONG_S)
        assert took and took[0] < LONG_S / 2


def test_dul_wait_survives_a_socket_closed_under_it() -> None:
    ours, peer = socket.socketpair()
    peer.close()
    ours.close()
    waiter = _DulWaiter(_fake_dul(ours))
    waiter.wait(0.01)  # falls back to a plain sleep, no exception


class _DulThread(threading.Thread):
    """A thread that is its own DUL, as pynetdicom's ``DULServiceProvider`` is."""

    def __init__(self) -> None:
        super().__init__()
        self.socket = SimpleNamespace(socket=None, _is_connected=False)
        self.waiter = _DulWaiter(self)

    def run(self) -> None:
        self.waiter.wake()


def test_a_wake_from_the_dul_thread_itself_writes_nothing() -> None:
    dul = _DulThread()
    dul.start()
    dul.join()
    waiter = dul.waiter
    start = time.monotonic()
    waiter.wait(0.05)
    assert time.monotonic() - start >= 0.04


def test_reactor_wait_ends_on_queued_work_and_is_rearmed() -> None:
    work = threading.Event()
    messages: queue.Queue[str] = queue.Queue()
    prompt_reactors._wake_on_put(messages, work.set)
    wait = _event_waiter(work)
    thread, took = _in_thread(lambda: wait(LONG_S))
    time.sleep(0.05)
    messages.put("C-STORE-RQ")
    thread.join(LONG_S)
    assert took and took[0] < LONG_S / 2
    assert messages.get_nowait() == "C-STORE-RQ"  # the queue itself is unchanged
    assert not work.is_set()


class _Reactor(threading.Thread):
    """A thread standing in for a DUL or association reactor."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.waited: list[float] = []
        self.took = 0.0

    def _triage_wait(self, seconds: float) -> None:
        self.waited.append(seconds)

    def run(self) -> None:
        start = time.monotonic()
        _ReactorTime.sleep(self.seconds)
        self.took = time.monotonic() - start


def test_only_a_reactors_nap_becomes_a_wait() -> None:
    nap = _Reactor(NAP_S)
    nap.start()
    nap.join()
    assert nap.waited == [NAP_S]

    other = _Reactor(0.02)  # pynetdicom's other sleeps (shutdown delays) are real sleeps
    other.start()
    other.join()
    assert other.waited == []
    assert other.took >= 0.015

    start = time.monotonic()
    _ReactorTime.sleep(0.02)  # a thread with no waiter: a real sleep
    assert time.monotonic() - start >= 0.015


def test_install_replaces_time_only_inside_the_two_pynetdicom_modules(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dul_module, "time", time)
    monkeypatch.setattr(association_module, "time", time)
    real_sleep = time.sleep
    prompt_reactors.install()
    prompt_reactors.install()
    assert isinstance(dul_module.time, _ReactorTime)
    assert isinstance(association_module.time, _ReactorTime)
    assert not isinstance(dul_module.time.time, _ReactorTime)
    assert dul_module.time.monotonic is time.monotonic
    assert time.sleep is real_sleep  # the process-wide time module is left alone


def test_the_reply_we_queued_decides_how_an_association_ended() -> None:
    """The DUL now sends a reply as soon as it is queued, so the peer can hang up before
    pynetdicom sets ``is_rejected`` / ``is_released``: the audit goes by what we sent."""
    from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT, A_RELEASE

    from triage.dicom.listener import _acse_reply_kind

    rejection = A_ASSOCIATE()
    rejection.result = 0x01
    acceptance = A_ASSOCIATE()
    acceptance.result = 0x00
    release_reply = A_RELEASE()
    release_reply.result = "affirmative"
    assert _acse_reply_kind(rejection) == "rejection"
    assert _acse_reply_kind(acceptance) == ""
    assert _acse_reply_kind(release_reply) == "release"
    assert _acse_reply_kind(A_RELEASE()) == ""  # a release request is not the end yet
    assert _acse_reply_kind(A_ABORT()) == "abort"
    assert _acse_reply_kind(A_P_ABORT()) == "abort"
