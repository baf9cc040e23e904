"""Unknown User Information sub-items in an A-ASSOCIATE-RQ, skipped as other SCPs do.

pynetdicom decodes only the sub-items of PS3.7 Annex D (0x51 to 0x59) and raises on any other
type, so a PACS that adds a vendor or newer sub-item to its request was aborted before its
first C-STORE. DCMTK and most SCPs skip a sub-item they do not know (its length says where
the next one starts); so does the listener, with :func:`without_unknown_user_sub_items`
applied to the request before pynetdicom decodes it.
"""

from __future__ import annotations

import struct

from pynetdicom.pdu_items import PDU_ITEM_TYPES

#: The fixed fields of an A-ASSOCIATE-RQ after the PDU header: protocol version, reserved,
#: called and calling AE titles, 32 reserved bytes (PS3.8 Table 9-11).
_FIXED_FIELDS = 6 + 2 + 2 + 16 + 16 + 32
_USER_INFORMATION = 0x50
_KNOWN_SUB_ITEMS = frozenset(kind for kind in PDU_ITEM_TYPES if 0x51 <= kind <= 0x5F)


def _items(body: bytes | bytearray) -> list[tuple[int, bytes]] | None:
    """(type, whole encoded item) for each item of *body*; None when a length runs past it
    (left for pynetdicom's decoder to refuse)."""
    items = []
    offset = 0
    while offset < len(body):
        if offset + 4 > len(body):
            return None
        kind, _, length = struct.unpack_from(">BBH", body, offset)
        end = offset + 4 + length
        if end > len(body):
            return None
        items.append((kind, bytes(body[offset:end])))
        offset = end
    return items


def without_unknown_user_sub_items(request: bytes | bytearray) -> tuple[bytes, list[int]]:
    """*request* (an encoded A-ASSOCIATE-RQ PDU, header included) without the User
    Information sub-items pynetdicom does not know, and the types taken out.

    A request that does not parse as items is returned unchanged: pynetdicom's decoder
    gives its reason.
    """
    items = _items(request[_FIXED_FIELDS:])
    if items is None:
        return bytes(request), []
    skipped: list[int] = []
    rebuilt = bytearray(request[6:_FIXED_FIELDS])
    for kind, item in items:
        sub_items = _items(item[4:]) if kind == _USER_INFORMATION else None
        if sub_items is not None:
            known = b"".join(sub for sub_kind, sub in sub_items if sub_kind in _KNOWN_SUB_ITEMS)
            skipped += [sub_kind for sub_kind, _ in sub_items if sub_kind not in _KNOWN_SUB_ITEMS]
            item = struct.pack(">BBH", kind, 0, len(known)) + known
        rebuilt += item
    if not skipped:
        return bytes(request), []
    return struct.pack(">BBL", request[0], 0, len(rebuilt)) + bytes(rebuilt), skipped
