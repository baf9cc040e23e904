"""Requested associations whose socket descriptor is past select(2)'s FD_SETSIZE."""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom.sop_class import Verification

from tests.peers import Storescp
from triage.dicom.polling_socket import RequestorAE
from triage.dicom.sender import associate

#: Descriptors held so that the association's socket gets one past 1024.
_HELD = 1100


@pytest.fixture
def descriptors_past_fd_setsize() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = _HELD + 200
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} too low")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(_HELD)]
    try:
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.usefixtures("descriptors_past_fd_setsize")
def test_a_requested_association_works_past_fd_setsize(tmp_path: Path) -> None:
    """pynetdicom's socket polls with select(2), which refuses a descriptor past 1024 and
    was taken for a closed connection: a daemon holding that many descriptors (the units
    allow 65536) could deliver nothing, and `triage-admin echo` failed the same way."""
    pacs = Storescp(tmp_path / "pacs").start()
    try:
        ae = RequestorAE(ae_title="TRIAGE")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_requested_context(Verification)
        assoc, tls_error = associate(ae, "127.0.0.1", pacs.port, pacs.ae_title, None)
        assert tls_error is None
        assert assoc.is_established
        assert assoc.dul.socket.socket.fileno() > 1024
        status = assoc.send_c_echo()
        assert status.Status == 0x0000
        assoc.release()
        assert assoc.is_released
    finally:
        pacs.stop()
