"""The listener's byte-by-byte C-STORE responses and File Meta equal pynetdicom's and
pydicom's own output (triage.dicom.fast_commands)."""

from __future__ import annotations

from io import BytesIO
from types import SimpleNamespace

import pytest
from pydicom.filewriter import write_file_meta_info as pydicom_write_file_meta_info
from pynetdicom import evt
from pynetdicom._handlers import standard_dimse_sent_handler
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import create_file_meta as pynetdicom_create_file_meta

from triage.dicom.fast_commands import (
    FileMeta,
    create_file_meta,
    encode_c_store_rsp,
    fast_send_msg,
    write_file_meta_info,
)

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


def _response(
    status: int, comment: str | None, sop_class: str, sop_instance: str, message_id: int = 7
) -> C_STORE:
    rsp = C_STORE()
    rsp.MessageID = message_id
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = sop_class
    rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = status
    if comment:
        rsp.ErrorComment = comment
    return rsp


def _pynetdicom_bytes(rsp: C_STORE, context_id: int = 1) -> bytes:
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    [pdata] = list(message.encode_msg(context_id, 16382))
    [(pdv_context, data)] = pdata.presentation_data_value_list
    assert pdv_context == context_id and data[:1] == b"\x03"
    return data[1:]


@pytest.mark.parametrize(
    ("status", "comment", "sop_class", "sop_instance", "message_id"),
    [
        (0x0000, None, DX_PRESENTATION, "1.2.3.4.5", 1),
        (0x0000, None, CT_IMAGE, "1.2.3.4.56", 65535),
        (0xA700, "spool below free-space floor", DX_PRESENTATION, "2.25.1234567", 12),
        (0xC000, "odd", DX_PRESENTATION, "2.25.12345678", 3),
        (0xA900, "dataset does not match SOP class", CT_IMAGE, "1.2.3", 9),
        (0xB000, None, DX_PRESENTATION, "1." + "2" * 62, 40000),
    ],
)
def test_c_store_response_bytes_equal_pynetdicoms(
    status: int, comment: str | None, sop_class: str, sop_instance: str, message_id: int
) -> None:
    rsp = _response(status, comment, sop_class, sop_instance, message_id)
    ours = encode_c_store_rsp(message_id, status, sop_class, sop_instance, comment)
    assert ours == _pynetdicom_bytes(rsp)


class _Recorder:
    def __init__(self, handlers: list | None = None, maximum_pdu_size: int = 16382) -> None:
        self.sent: list = []
        self.originals: list = []
        self.maximum_pdu_size = maximum_pdu_size
        self.dul = SimpleNamespace(send_pdu=self.sent.append)
        bound = handlers if handlers is not None else [(standard_dimse_sent_handler, None)]
        self.assoc = SimpleNamespace(
            get_handlers=lambda event: bound if event is evt.EVT_DIMSE_SENT else []
        )

    def original(self, primitive, context_id) -> None:  # type: ignore[no-untyped-def]
        self.originals.append((primitive, context_id))


def test_send_msg_puts_one_command_pdv_on_the_dul() -> None:
    dimse = _Recorder()
    send = fast_send_msg(dimse, dimse.original)
    rsp = _response(0xA700, "spool below free-space floor", DX_PRESENTATION, "2.25.99")
    send(rsp, 5)
    assert dimse.originals == []
    [pdata] = dimse.sent
    [(context_id, data)] = pdata.presentation_data_value_list
    assert context_id == 5
    assert data == b"\x03" + _pynetdicom_bytes(rsp, 5)


def test_send_msg_leaves_everything_else_to_pynetdicom() -> None:
    cases = []
    echo = C_ECHO()
    echo.MessageIDBeingRespondedTo = 1
    echo.Status = 0
    cases.append((_Recorder(), echo))  # not a C-STORE
    request = C_STORE()
    request.MessageID = 1
    cases.append((_Recorder(), request))  # a request, not a response
    offending = _response(0xC000, None, DX_PRESENTATION, "1.2.3")
    offending.OffendingElement = [0x00100010]
    cases.append((_Recorder(), offending))  # an element we do not write
    cases.append((_Recorder(maximum_pdu_size=64), _response(0, None, CT_IMAGE, "1.2.3.4")))
    custom = [(standard_dimse_sent_handler, None), (lambda event: None, None)]
    cases.append((_Recorder(handlers=custom), _response(0, None, CT_IMAGE, "1.2.3.4")))
    accented = _response(0xC000, "données", CT_IMAGE, "1.2.3.4")  # not ASCII
    cases.append((_Recorder(), accented))
    for dimse, primitive in cases:
        fast_send_msg(dimse, dimse.original)(primitive, 3)
        assert dimse.sent == []
        assert dimse.originals == [(primitive, 3)]


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "syntax"),
    [
        (DX_PRESENTATION, "1.2.3.4.5", "1.2.840.10008.1.2.1"),
        (CT_IMAGE, "2.25.123456789", "1.2.840.10008.1.2.4.90"),
        (DX_PRESENTATION, "1." + "9" * 62, "1.2.840.10008.1.2"),
    ],
)
def test_file_meta_bytes_equal_pydicoms(sop_class: str, sop_instance: str, syntax: str) -> None:
    expected = BytesIO()
    pydicom_write_file_meta_info(
        expected,
        pynetdicom_create_file_meta(
            sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=syntax
        ),
    )
    ours = BytesIO()
    meta = create_file_meta(
        sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=syntax
    )
    assert isinstance(meta, FileMeta)
    write_file_meta_info(ours, meta)
    assert ours.getvalue() == expected.getvalue()


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_file_meta_pydicom_cannot_write_is_refused_as_before() -> None:
    """A UID from the peer that these encoders cannot write goes to pydicom, which decides."""
    meta = create_file_meta(
        sop_class_uid=DX_PRESENTATION,
        sop_instance_uid="1.2.3.ü",
        transfer_syntax="1.2.840.10008.1.2",
    )
    expected = BytesIO()
    try:
        pydicom_write_file_meta_info(
            expected,
            pynetdicom_create_file_meta(
                sop_class_uid=DX_PRESENTATION,
                sop_instance_uid="1.2.3.ü",
                transfer_syntax="1.2.840.10008.1.2",
            ),
        )
    except Exception as exc:  # pydicom's own verdict, whatever it is
        with pytest.raises(type(exc)):
            write_file_meta_info(BytesIO(), meta)
    else:
        ours = BytesIO()
        write_file_meta_info(ours, meta)
        assert ours.getvalue() == expected.getvalue()
