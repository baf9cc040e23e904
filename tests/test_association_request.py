"""Unknown User Information sub-items taken out of an A-ASSOCIATE-RQ before decoding."""

from __future__ import annotations

import struct

from pynetdicom.pdu import A_ASSOCIATE_RQ

from tests.test_listener_protocol import _association_request, _with_user_sub_item
from triage.dicom.association_request import without_unknown_user_sub_items


def test_a_request_without_unknown_sub_items_is_returned_as_it_is() -> None:
    request = _association_request(context_id=1)
    assert without_unknown_user_sub_items(request) == (request, [])


def test_unknown_sub_items_go_and_the_lengths_follow() -> None:
    original = _association_request(context_id=1)
    request = _with_user_sub_item(_with_user_sub_item(original, 0x5E, b"x"), 0x60, b"")
    cleaned, skipped = without_unknown_user_sub_items(request)
    assert skipped == [0x5E, 0x60]
    assert cleaned == original
    pdu = A_ASSOCIATE_RQ()
    pdu.decode(cleaned)
    assert pdu.user_information.maximum_length == 16382


def test_a_request_whose_lengths_do_not_add_up_is_left_for_the_decoder() -> None:
    request = bytearray(_with_user_sub_item(_association_request(context_id=1), 0x5E, b"x"))
    item = request.rindex(b"\x5e\x00")
    struct.pack_into(">H", request, item + 2, 200)  # runs past the end
    assert without_unknown_user_sub_items(request) == (bytes(request), [])
