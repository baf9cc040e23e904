"""C-STORE responses and received files' File Meta, written byte by byte.

Two small fixed layouts that pynetdicom builds with pydicom's general-purpose machinery once
per received instance, on the path between the last byte in and the answer out:

- each C-STORE-RSP becomes a pydicom ``Dataset`` that is encoded twice (once to learn the
  command group length): 1.2 ms of Python per answer here;
- each data set pynetdicom writes to a file starts with File Meta Information built as a
  ``FileMetaDataset`` and written by pydicom's writer: 0.5 ms per instance.

:func:`encode_c_store_rsp` and :class:`FileMeta` write the same bytes directly (Implicit VR
Little Endian for the command set, Explicit VR Little Endian for the meta group, PS3.7 E and
PS3.10 7.1); tests compare them byte for byte with pynetdicom's and pydicom's output. Anything
else — other messages, extra status elements, a value these encoders refuse, an event
handler that wants the DIMSE message object — takes pynetdicom's own path.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from pydicom.filewriter import write_file_meta_info as _pydicom_write_file_meta_info
from pynetdicom import (
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    dimse_messages,
)
from pynetdicom import evt as _evt
from pynetdicom._handlers import standard_dimse_sent_handler
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101
#: PDV message control header: command fragment, last fragment.
_LAST_COMMAND_FRAGMENT = b"\x03"
#: PDU header (6) + PDV item length and context ID (5) + control header (1).
_PDU_OVERHEAD = 12
_LONGEST_VALUE = 0xFFFF  # an even length that still fits the explicit VR 16-bit length


def _padded(value: str, pad: bytes) -> bytes:
    data = value.encode("ascii")
    return data + pad if len(data) % 2 else data


def _implicit(group: int, element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", group, element, len(value)) + value


def encode_c_store_rsp(
    message_id: int,
    status: int,
    sop_class_uid: str | None,
    sop_instance_uid: str | None,
    error_comment: str | None = None,
) -> bytes:
    """The command set of a C-STORE-RSP as pynetdicom encodes it (Implicit VR LE).

    Raises ValueError (UnicodeError) for a value that is not ASCII or an out-of-range number.
    """
    elements = []
    if sop_class_uid:
        elements.append(_implicit(0x0000, 0x0002, _padded(sop_class_uid, b"\0")))
    elements.append(_implicit(0x0000, 0x0100, struct.pack("<H", _C_STORE_RSP)))
    elements.append(_implicit(0x0000, 0x0120, struct.pack("<H", message_id)))
    elements.append(_implicit(0x0000, 0x0800, struct.pack("<H", _NO_DATA_SET)))
    elements.append(_implicit(0x0000, 0x0900, struct.pack("<H", status)))
    if error_comment:
        elements.append(_implicit(0x0000, 0x0902, _padded(error_comment, b" ")))
    if sop_instance_uid:
        elements.append(_implicit(0x0000, 0x1000, _padded(sop_instance_uid, b"\0")))
    body = b"".join(elements)
    return _implicit(0x0000, 0x0000, struct.pack("<I", len(body))) + body


def _plain_c_store_response(primitive: Any) -> bool:
    """A C-STORE-RSP carrying only what :func:`encode_c_store_rsp` writes."""
    return (
        type(primitive) is C_STORE
        and primitive.MessageIDBeingRespondedTo is not None
        and primitive.Status is not None
        and primitive.OffendingElement is None
    )


def fast_send_msg(dimse: Any, original: Callable[[Any, int], None]) -> Callable[[Any, int], None]:
    """A ``send_msg`` for *dimse* (an association's DIMSE provider) that encodes plain
    C-STORE responses itself and hands every other message to *original*."""

    def send_msg(primitive: Any, context_id: int) -> None:
        if not _plain_c_store_response(primitive) or _wants_message_objects(dimse.assoc):
            original(primitive, context_id)
            return
        try:
            command = encode_c_store_rsp(
                primitive.MessageIDBeingRespondedTo,
                primitive.Status,
                primitive.AffectedSOPClassUID,
                primitive.AffectedSOPInstanceUID,
                primitive.ErrorComment,
            )
        except (ValueError, struct.error):
            original(primitive, context_id)
            return
        limit = dimse.maximum_pdu_size
        if limit and len(command) + _PDU_OVERHEAD > limit:
            original(primitive, context_id)  # a peer with tiny PDUs: pynetdicom fragments
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list = [[context_id, _LAST_COMMAND_FRAGMENT + command]]
        dimse.dul.send_pdu(pdata)

    return send_msg


def _wants_message_objects(assoc: Any) -> bool:
    """True when a handler other than pynetdicom's standard logger (which ignores C-STORE
    responses) is bound to EVT_DIMSE_SENT and expects the message object."""
    return any(
        handler is not standard_dimse_sent_handler
        for handler, _args in assoc.get_handlers(_evt.EVT_DIMSE_SENT)
    )


@dataclass(frozen=True)
class FileMeta:
    """The File Meta Information pynetdicom writes before a received data set."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    implementation_uid: str = PYNETDICOM_IMPLEMENTATION_UID
    implementation_version: str = PYNETDICOM_IMPLEMENTATION_VERSION

    def encode(self) -> bytes:
        """Group 0002 in Explicit VR Little Endian, with its group length first."""
        body = b"".join(
            (
                struct.pack("<HH2s2xI", 0x0002, 0x0001, b"OB", 2) + b"\x00\x01",
                _explicit_short(0x0002, b"UI", _padded(self.sop_class_uid, b"\0")),
                _explicit_short(0x0003, b"UI", _padded(self.sop_instance_uid, b"\0")),
                _explicit_short(0x0010, b"UI", _padded(self.transfer_syntax, b"\0")),
                _explicit_short(0x0012, b"UI", _padded(self.implementation_uid, b"\0")),
                _explicit_short(0x0013, b"SH", _padded(self.implementation_version, b" ")),
            )
        )
        return _explicit_short(0x0000, b"UL", struct.pack("<I", len(body))) + body


def _explicit_short(element: int, vr: bytes, value: bytes) -> bytes:
    if len(value) > _LONGEST_VALUE:
        raise ValueError(f"value of (0002,{element:04X}) too long ({len(value)} bytes)")
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def create_file_meta(
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax: str,
    implementation_uid: str = PYNETDICOM_IMPLEMENTATION_UID,
    implementation_version: str = PYNETDICOM_IMPLEMENTATION_VERSION,
) -> FileMeta:
    """pynetdicom's ``create_file_meta``, as a :class:`FileMeta`."""
    return FileMeta(
        str(sop_class_uid),
        str(sop_instance_uid),
        str(transfer_syntax),
        str(implementation_uid),
        str(implementation_version),
    )


def write_file_meta_info(fp: BinaryIO, file_meta: Any, enforce_standard: bool = True) -> None:
    """pydicom's ``write_file_meta_info``, byte by byte for a :class:`FileMeta`."""
    if isinstance(file_meta, FileMeta):
        try:
            fp.write(file_meta.encode())
            return
        except (ValueError, struct.error):
            file_meta = _as_pydicom(file_meta)  # pydicom writes (or refuses) it its own way
    _pydicom_write_file_meta_info(fp, file_meta, enforce_standard)


def _as_pydicom(file_meta: FileMeta) -> Any:
    from pynetdicom.dsutils import create_file_meta as pynetdicom_create_file_meta

    return pynetdicom_create_file_meta(
        sop_class_uid=file_meta.sop_class_uid,
        sop_instance_uid=file_meta.sop_instance_uid,
        transfer_syntax=file_meta.transfer_syntax,
        implementation_uid=file_meta.implementation_uid,
        implementation_version=file_meta.implementation_version,
    )


def install() -> None:
    """Make pynetdicom write received files' File Meta with :class:`FileMeta`."""
    dimse_messages.create_file_meta = create_file_meta  # type: ignore[assignment]
    dimse_messages.write_file_meta_info = write_file_meta_info  # type: ignore[assignment]
