"""What the sender makes of a PACS's C-STORE status, against a PACS answering each one.

DCMTK's storescp cannot be told which status to answer, so the PACS here is a pynetdicom
server over TCP. PS3.7 Annex C's general warnings (0x0001, 0x0107, 0x0116) mean the object
was stored, like the storage warnings 0xBxxx; 0x0213 (resource limitation) means try later.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pynetdicom import AE, evt

from tests.peers import free_port
from tests.test_admin import SC_CLASS, SR_CLASS, sender_site
from triage.dicom.sender import Sender
from triage.store.models import DeliveryState
from triage.store.outbox import Outbox


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (0x0000, DeliveryState.DONE),
        (0xB000, DeliveryState.DONE),
        (0x0001, DeliveryState.DONE),
        (0x0107, DeliveryState.DONE),
        (0x0116, DeliveryState.DONE),
        (0x0213, DeliveryState.PENDING),  # retried later
        (0xA700, DeliveryState.PENDING),
        (0xC000, DeliveryState.FAILED),
    ],
    ids=lambda value: f"0x{value:04X}" if isinstance(value, int) else value.value,
)
def test_the_pacs_status_decides_delivered_retried_or_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, status: int, expected: DeliveryState
) -> None:
    for name in list(os.environ):
        if name.startswith("TRIAGE_"):
            monkeypatch.delenv(name)
    port = free_port()
    pacs = AE(ae_title="PACS")
    for sop_class in (SR_CLASS, SC_CLASS):
        pacs.add_supported_context(sop_class)
    server = pacs.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda _e: status)]
    )
    _path, config, store, spool, study_uid = sender_site(tmp_path, {"port": port})
    engine = store.engine
    try:
        Sender(config, store, spool).deliver_once(config.destinations[0])
        states = {delivery.state for delivery, _ in Outbox(store).deliveries(study_uid)}
    finally:
        server.shutdown()
        engine.dispose()
    assert states == {expected}
