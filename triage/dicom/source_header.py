"""Source headers made fit to build outputs from, and the character set those outputs declare.

The SR, overlays and parametric maps copy the patient and study of a source image, and
highdicom reads and checks several of its values. Real headers break it in common ways:
a Type 2 attribute left out (AccessionNumber, PatientBirthDate …), a date of ``00000000``,
a PatientSex of ``U``, a SpecificCharacterSet spelt ``ISO IR 100`` or ``\\ISO 2022 IR 87``
(highdicom only takes the spellings of its enum, and no empty first value). One study's
header must not make the study FAILED, so builders work from :func:`header_for_outputs`, a
copy of the header with those repaired, hand highdicom no character set, and declare the
character set on the finished object with :func:`declare_character_set`.

The copy keeps every value that is valid as the source has it; what cannot be carried over
validly is emptied (an unparseable date) or cut to its VR's length (a 70-character
StudyDescription), which is what the outputs need to pass dciodvfy. The keys a PACS and a
RIS file results by (PatientID, IssuerOfPatientID, AccessionNumber, StudyID) are the
exception: copied exactly, even too long, since results filed under a cut PatientID land
under another patient.
"""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pydicom
from pydicom.charset import convert_encodings, default_encoding, encode_string, python_encoding
from pydicom.datadict import dictionary_VM, dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.valuerep import DA, TM, PersonName, format_number_as_ds

#: Attributes highdicom reads from a source without a default; absent, they are added empty
#: (all but Modality are Type 2 in the source's Patient and General Study modules).
_REQUIRED = {
    "PatientName": "PN",
    "PatientID": "LO",
    "PatientBirthDate": "DA",
    "PatientSex": "CS",
    "StudyDate": "DA",
    "StudyTime": "TM",
    "ReferringPhysicianName": "PN",
    "StudyID": "SH",
    "AccessionNumber": "SH",
    "Modality": "CS",
}
#: Most bytes of one value (PS3.5 6.2; dciodvfy counts the encoded bytes, so a 40-letter
#: GB18030 description is too long for LO); PN is per component group. DS, IS and UI are never
#: cut: cutting a number or a UID would change what it says.
_MAX_BYTES = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "ST": 1024, "LT": 10240, "PN": 64}
_CS = re.compile(r"^[A-Z0-9 _]*$")
_AS = re.compile(r"^(\d{1,3})([DWMY])$")
_DS = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?$")
_IS = re.compile(r"^[+-]?\d+$")
#: A PN value has at most five components in each of at most three groups (PS3.5 6.2.1).
_PN_COMPONENTS = 5
_PN_GROUPS = 3
#: VRs whose values are encoded in the character set (PS3.5 6.1.2.3).
_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UC", "UT", "PN"})
#: VRs whose values are characters (PS3.5 6.2): a value sent under one of them reads the same
#: under another.
_STRING_VRS = _TEXT_VRS | {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI", "UR"}
_PATIENT_SEXES = frozenset({"M", "F", "O"})
#: PatientID, IssuerOfPatientID, AccessionNumber, StudyID: never changed (see _fitted).
_MATCHING_KEYS = frozenset({0x00100020, 0x00100021, 0x00080050, 0x00200010})
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
#: Sequences that are Type 2C (present, maybe empty) where they apply: the non-human
#: patient's breed. Every other sequence an output copies is Type 3 or has its own value, and
#: present it needs one item at least (dciodvfy: "Bad Sequence number of Items = <0>").
_EMPTY_SEQUENCES_KEPT = frozenset({0x00102293, 0x00102294})
#: Transfer syntaxes that are lossy whatever the image says: JPEG Baseline and Extended,
#: JPEG-LS near-lossless (PS3.5 A.4), with their Lossy Image Compression Method.
_LOSSY_TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",
}
_SPECIFIC_CHARACTER_SET = 0x00080005

_STRICT_DA = re.compile(r"^\d{8}$")
_STRICT_TM = re.compile(r"^(?:[01]\d|2[0-3])(?:[0-5]\d(?:[0-5]\d(?:\.\d{1,6})?)?)?$")
# "ISO IR 100", "ISO_IR100", "iso-2022-ir-87" …: the standard's terms as mistyped in the wild.
_ISO_TERM = re.compile(r"^ISO[ _-]?(2022[ _-]?)?IR[ _-]?(\d+)$")
#: Terms of the default repertoire (ASCII).
_DEFAULT_TERMS = frozenset({"", "ISO_IR 6", "ISO 2022 IR 6"})
#: Terms that stand alone: no code extensions with them (PS3.3 C.12.1.1.2).
_STANDALONE_TERMS = frozenset({"ISO_IR 192", "GB18030", "GBK"})
_MULTI_BYTE_TERMS = frozenset(
    {"ISO 2022 IR 87", "ISO 2022 IR 159", "ISO 2022 IR 149", "ISO 2022 IR 58"}
)
_UTF8 = "ISO_IR 192"
#: Source sets written as another that holds the same text: dciodvfy (dicom3tools) rejects
#: GBK's bytes and unescaped ISO_IR 13 katakana. GB18030 is a superset of GBK with the same
#: two-byte codes; ISO 2022 IR 13 with IR 87 is how Japanese sites declare half-width
#: katakana (and kanji), and pydicom writes it with escape sequences that every reader knows.
_OUTPUT_EQUIVALENTS = {
    ("GBK",): ("GB18030",),
    ("ISO_IR 13",): ("ISO 2022 IR 13", "ISO 2022 IR 87"),
}
_LATIN_1 = "ISO_IR 100"
_UTF8_ENCODINGS = convert_encodings(_UTF8)


def normalise_character_set(value: Any) -> tuple[str, ...]:
    """The defined terms a SpecificCharacterSet *value* means; ``()`` is the default repertoire.

    Spelling variants are mapped to the standard's terms (``ISO IR 100``, ``iso_ir 192``);
    ``ISO_IR 6`` and a single ISO 2022 term of a single-byte set mean what the plain term
    does; a multi-valued value keeps its (possibly empty) first term and lists the others in
    their ISO 2022 form, once each. Terms no codec is known for are dropped.
    """
    terms = [_standard_term(term) for term in _terms(value)]
    if len(terms) > 1 and not all(term in _DEFAULT_TERMS for term in terms[1:]):
        first = terms[0] if terms[0] in python_encoding else ""
        if first in _STANDALONE_TERMS:
            return (first,)  # the text is in it; code extensions cannot go with it
        extended = [first if first in _DEFAULT_TERMS else _extension(first)]
        for term in terms[1:]:
            if term in python_encoding and term not in _STANDALONE_TERMS:
                term = _extension(term)
                if term not in extended:
                    extended.append(term)
        if len(extended) > 1:
            return tuple(extended)
        return _single(extended[0])
    known = [term for term in terms if term in python_encoding]
    return _single(known[0] if known else "")


def _terms(value: Any) -> list[str]:
    """The terms of a SpecificCharacterSet value as stored: decoded or raw bytes."""
    if value is None:
        return []
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, str):
        values: list[object] = list(value.split("\\"))
    else:
        values = list(value)
    return [str(term if term is not None else "").strip(" \x00") for term in values]


def _standard_term(term: str) -> str:
    term = term.strip().upper()
    match = _ISO_TERM.match(term)
    if match is None:
        return term
    number = int(match.group(2))
    return f"ISO 2022 IR {number}" if match.group(1) else f"ISO_IR {number}"


def _extension(term: str) -> str:
    """*term* as a code extension (``ISO_IR 100`` → ``ISO 2022 IR 100``)."""
    if term.startswith("ISO_IR "):
        extended = "ISO 2022 IR " + term[len("ISO_IR ") :]
        return extended if extended in python_encoding else term
    return term


def _single(term: str) -> tuple[str, ...]:
    """The value of a character set of one term."""
    if term in _DEFAULT_TERMS:
        return ()
    if term in _MULTI_BYTE_TERMS:  # a multi-byte set extends the default repertoire
        return ("", term)
    if term.startswith("ISO 2022 IR "):  # without a second set, the plain term says it
        plain = "ISO_IR " + term[len("ISO 2022 IR ") :]
        return (plain,) if plain in python_encoding else (term,)
    return (term,)


def character_set_of(dataset: pydicom.Dataset) -> tuple[str, ...]:
    """The normalised SpecificCharacterSet of *dataset* (see :func:`normalise_character_set`)."""
    element = dataset.get_item(_SPECIFIC_CHARACTER_SET)
    if element is None:
        return ()
    return normalise_character_set(element.value)


def header_for_outputs(source: pydicom.Dataset, also: Iterable[str] = ()) -> pydicom.Dataset:
    """A copy of *source*'s header (public elements, no pixel data) that the builders accept.

    - SpecificCharacterSet is normalised (GBK is written as GB18030 and ISO_IR 13 as
      ISO 2022 IR 13 with IR 87, see ``_OUTPUT_EQUIVALENTS``); text that pydicom decoded
      wrongly because it could not read the source's spelling is decoded again from its
      bytes, and text declared UTF-8 whose bytes are not is read as Latin-1 (what such
      sources hold);
    - the attributes highdicom reads (see ``_REQUIRED``) are added, empty, where absent;
    - a DA or TM value that does not parse is emptied (one in another DICOM-era format is
      rewritten in today's); a PatientSex that is not M, F or O (once stripped and upper-cased)
      is emptied;
    - a CS value is upper-cased, and emptied if still not a code string (``Finger(s)``); an
      AS value missing only its zero padding is padded, and any other invalid AS, DS or IS
      value (``45``, ``72,5``, ``1.80m``) emptied: no reader guesses a unit or a locale;
    - a value sent under another string VR than the dictionary's (a StudyTime as LO) is
      given the dictionary's, and made valid for it as below;
    - a PN value keeps at most three component groups of at most five components (the extra
      ones joined to the fifth); an attribute of one value given several (a PatientName
      with a backslash) keeps the first; a public attribute of no known dictionary is left out;
    - text values longer than their VR allows are cut to the bytes it allows in the outputs'
      character set (PN per component group);
    - the matching keys (``_MATCHING_KEYS``) are exempt from all of this: copied as they are.

    *also* is the output's own text (a reason, a note, a model name): where the source's set
    cannot hold it, the output is declared UTF-8 (see :func:`declare_character_set`) and the
    lengths are measured in UTF-8 too.

    *source* is not changed (beyond pydicom decoding its raw elements on access, as any read
    does); unchanged elements are shared with it.
    """
    declared = source.get_item(_SPECIFIC_CHARACTER_SET)
    charset = normalise_character_set(declared.value if declared is not None else None)
    written = _OUTPUT_EQUIVALENTS.get(charset, charset)
    redecoding = _redecoding(declared, charset)
    header = _copied(
        source, redecoding, convert_encodings(list(written) or [_LATIN_1]), top_level=True
    )
    texts = [*(t for t in _texts(header) if not t.isascii()), *(t for t in also if t)]
    if not _encodes(written or (_LATIN_1,), texts):
        # Text the set cannot hold (bytes it could not decode, read as U+FFFD) makes the
        # outputs UTF-8 (see declare_character_set): lengths are measured in UTF-8 then.
        header = _copied(source, redecoding, list(_UTF8_ENCODINGS), top_level=True)
    for keyword, vr in _REQUIRED.items():
        if keyword not in header:
            header.add_new(keyword, vr, None)
    syntax = str(getattr(source, "file_meta", {}).get("TransferSyntaxUID", ""))
    if syntax in _LOSSY_TRANSFER_SYNTAXES and header.get("LossyImageCompression") != "01":
        # Received lossy-compressed without saying so (Type 3 in a CR): derived images must.
        header.LossyImageCompression = "01"
        header.LossyImageCompressionMethod = _LOSSY_TRANSFER_SYNTAXES[syntax]
        if "LossyImageCompressionRatio" in header:
            del header.LossyImageCompressionRatio  # one ratio per method, or none
    charset = written
    if charset:
        header.SpecificCharacterSet = charset[0] if len(charset) == 1 else list(charset)
    elif _SPECIFIC_CHARACTER_SET in header:
        del header[_SPECIFIC_CHARACTER_SET]
    return header


def declare_character_set(output: pydicom.Dataset, header: pydicom.Dataset) -> None:
    """Set *output*'s SpecificCharacterSet: *header*'s (from :func:`header_for_outputs`), or
    the smallest that encodes every text value of *output* where that one cannot.

    A source without a character set (or with the default one) whose text is not ASCII was
    read as Latin-1, so ISO_IR 100 keeps those bytes as they were; text no declared set can
    encode (a reason in the SR, a name decoded with replacement characters) makes it UTF-8.
    """
    charset = character_set_of(header)
    texts = [text for text in _texts(output) if not text.isascii()]
    if texts and not _encodes(charset, texts):
        charset = (_LATIN_1,) if not charset and _encodes((_LATIN_1,), texts) else (_UTF8,)
    if charset:
        output.SpecificCharacterSet = charset[0] if len(charset) == 1 else list(charset)
    elif _SPECIFIC_CHARACTER_SET in output:
        del output[_SPECIFIC_CHARACTER_SET]


def fitted_text(text: str, header: pydicom.Dataset, vr: str) -> str:
    """*text* of an output's own (a model's name in SoftwareVersions) cut to the bytes *vr*
    allows both in the character set of *header* (from :func:`header_for_outputs`) and in
    UTF-8, which an output is declared in where some of its text is not in that set (see
    :func:`declare_character_set`); which one the output ends in depends on all its text.
    Cut to so many characters instead, a Cyrillic model name was twice too long in UTF-8."""
    limit = _MAX_BYTES[vr]
    text = _cut(text, limit, list(_UTF8_ENCODINGS))
    charset = character_set_of(header) or (_LATIN_1,)
    if _encodes(charset, [text]):
        text = _cut(text, limit, convert_encodings(list(charset)))
    return text


# --- copying --------------------------------------------------------------------------------


def _redecoding(
    declared: DataElement | RawDataElement | None, charset: tuple[str, ...]
) -> list[str] | None:
    """The Python encodings to decode the source's text with again, or None if pydicom's are
    right: where pydicom did not know the source's spelling (it then reads Latin-1) but the
    normalised one is known, and for UTF-8 (to catch Latin-1 bytes declared UTF-8)."""
    if charset == (_UTF8,):
        return list(_UTF8_ENCODINGS)
    if declared is None or not charset:
        return None
    terms = _terms(declared.value)
    if all(term in python_encoding for term in terms):
        return None  # pydicom read the source as it says
    wanted = convert_encodings(list(charset))
    return wanted if convert_encodings(terms) != wanted else None


def _copied(
    dataset: pydicom.Dataset,
    encodings: list[str] | None,
    output: list[str],
    *,
    top_level: bool = False,
) -> pydicom.Dataset:
    # What pydicom decodes this data set's text with (it warns on every look at a misspelt
    # character set, so once).
    read_as = dataset._character_set if encodings is not None else None
    copy = pydicom.Dataset()
    for tag in list(dataset.keys()):
        if tag.is_private or tag in _PIXEL_TAGS or tag.element == 0:
            continue  # nothing highdicom or the builders copy into an output
        if _dictionary_vr(tag) is None:
            continue  # a public attribute of no known dictionary: invalid in any output
        element = _decoded(dataset, tag, encodings, read_as)
        if element.VR == "SQ" and not element.value and tag not in _EMPTY_SEQUENCES_KEPT:
            continue  # an empty Type 3 sequence (copied from a worklist): invalid as is
        copy.add(_fitted(element, top_level=top_level, encodings=encodings, output=output))
    return copy


def _decoded(
    dataset: pydicom.Dataset, tag: int, encodings: list[str] | None, read_as: object
) -> DataElement:
    """The element of *tag*, its text decoded with *encodings* when given."""
    stored = dataset.get_item(tag)
    if encodings is None or tag == _SPECIFIC_CHARACTER_SET:
        return dataset[tag]
    if isinstance(stored, RawDataElement):
        vr = stored.VR or _dictionary_vr(tag)
        if vr not in _TEXT_VRS:
            return dataset[tag]
        data = bytes(stored.value or b"")
    else:
        element = dataset[tag]
        if element.VR not in _TEXT_VRS or read_as not in (default_encoding, [default_encoding]):
            return element  # only pydicom's fallback reading (Latin-1) can be undone
        latin_1 = _latin_1_bytes(element.value)
        if latin_1 is None:
            return element
        data, vr = latin_1, element.VR
        stored = RawDataElement(tag, vr, len(data), data, 0, False, True, True, False)
    chosen = list(encodings)
    if chosen == _UTF8_ENCODINGS:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            chosen = convert_encodings(_LATIN_1)  # declared UTF-8, written in Latin-1
    return convert_raw_data_element(stored._replace(VR=vr), encoding=chosen, ds=dataset)


def _dictionary_vr(tag: int) -> str | None:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


def _latin_1_bytes(value: object) -> bytes | None:
    """The bytes pydicom read as Latin-1 into *value*, or None for a value of another kind."""
    if value is None:
        return b""
    values = list(value) if isinstance(value, MultiValue | list) else [value]
    try:
        return "\\".join(str(v) for v in values).encode("latin-1")
    except UnicodeEncodeError:
        return None


def _fitted(
    element: DataElement, *, top_level: bool, encodings: list[str] | None, output: list[str]
) -> DataElement:
    """*element*, or a new one with its value made valid for the output (see
    :func:`header_for_outputs`); *output* are the Python encodings the outputs write text in."""
    vr, value = element.VR, element.value
    dictionary_vr = _dictionary_vr(element.tag)
    if vr in _STRING_VRS and dictionary_vr in _STRING_VRS:
        # Sent under another string VR (a StudyTime as LO, a name as LO): copied so, the
        # outputs held an invalid VR; the value is made valid for the dictionary's instead.
        vr = dictionary_vr
    if vr == "SQ":
        return DataElement(
            element.tag,
            vr,
            DicomSequence([_copied(item, encodings, output) for item in value or []]),
        )
    if value is None or value == "":
        return _with_vr(element, vr)
    if element.tag in _MATCHING_KEYS:
        # The PACS (Orthanc: PatientID with the StudyInstanceUID) and the RIS (the accession
        # number) file results by these: cut, they would file them under another patient or
        # order. Too long already in the source, they are copied as they are.
        return _with_vr(element, vr)
    if isinstance(value, MultiValue | list) and _single_valued(element.tag):
        value = value[0] if value else ""  # highdicom refuses a list for a name or a date
    if vr in ("DA", "TM"):
        fixed = _mapped(value, _date if vr == "DA" else _time)
    elif top_level and element.tag == 0x00100040:  # PatientSex
        sex = str(value).strip().upper()
        fixed = sex if sex in _PATIENT_SEXES else ""
    elif vr == "PN":
        fixed = _mapped(value, lambda name: _person_name(name, output))
    elif vr == "CS" and element.tag != _SPECIFIC_CHARACTER_SET:
        fixed = _mapped(value, _code_string)
    elif vr == "AS":
        fixed = _mapped(value, _age)
    elif vr in ("DS", "IS"):
        fixed = _mapped(value, _decimal if vr == "DS" else _integer)
    elif vr in _MAX_BYTES:
        limit = _MAX_BYTES[vr]
        fixed = _mapped(value, lambda text: _cut(str(text), limit, output))
    else:
        return _with_vr(element, vr)
    if fixed == element.value and vr == element.VR:
        return element
    return DataElement(element.tag, vr, fixed)


def _with_vr(element: DataElement, vr: str) -> DataElement:
    """*element*, or its value under *vr* where that is not its own."""
    return element if vr == element.VR else DataElement(element.tag, vr, element.value)


def _single_valued(tag: int) -> bool:
    try:
        return dictionary_VM(tag) == "1"
    except KeyError:
        return False


def _mapped(value: Any, fix: Callable[[Any], object]) -> object:
    """*fix* applied to each value of *value* (one, or a MultiValue)."""
    if isinstance(value, MultiValue | list):
        return [fix(v) for v in value]
    return fix(value)


def _code_string(value: object) -> str:
    """A CS value upper-cased (``hand`` is ``HAND``), or empty where that is still not one
    (``Finger(s)``): a Defined Term is upper case, and no reader guesses at the rest."""
    text = str(value).strip().upper()
    return text if len(text) <= _MAX_BYTES["CS"] and _CS.match(text) else ""


def _age(value: object) -> str:
    """An AS value (``045Y``), zero-filled where only the padding is missing (``45Y``);
    empty where the unit is (``45``: years or months?)."""
    match = _AS.match(str(value).strip().upper())
    return match.group(1).zfill(3) + match.group(2) if match else ""


def _decimal(value: object) -> object:
    """A DS value as it is; a number written too long (``0.14333333333333333``, common in
    pixel spacings) in 16 characters; anything else (``72,5``, ``1.80m``, NaN) empty."""
    text = str(value).strip()
    if len(text) <= 16 and _DS.match(text):
        return value
    if not _DS.match(text):
        return ""
    number = float(text)
    return format_number_as_ds(number) if math.isfinite(number) else ""


def _integer(value: object) -> object:
    text = str(value).strip()
    if len(text) <= 12 and _IS.match(text) and -(2**31) <= int(text) < 2**31:
        return value
    return ""


def _cut(text: str, limit: int, output: list[str]) -> str:
    """*text*, or its longest start that encodes in *limit* bytes or fewer."""
    if len(output) == 1 and len(text) <= limit // 4:
        return text  # no character takes more than four bytes (ISO 2022's escapes do)
    if _encoded_length(text, output) <= limit:
        return text
    fits, too_long = 0, min(len(text), limit) + 1  # each character takes a byte at least
    while too_long - fits > 1:  # a search: an LT is 10240 bytes
        middle = (fits + too_long) // 2
        if _encoded_length(text[:middle], output) <= limit:
            fits = middle
        else:
            too_long = middle
    return text[:fits].rstrip()


def _encoded_length(text: str, output: list[str]) -> int:
    return len(encode_string(text, output))


def _group_length(group: str, output: list[str]) -> int:
    """Bytes of one PN component group as written: each component is encoded on its own, so
    an ISO 2022 escape back to ASCII comes before every caret."""
    return len(PersonName(group).encode(output))


def _date(value: object) -> str:
    text = str(value).strip()
    if _STRICT_DA.match(text):
        try:
            datetime.date(int(text[:4]), int(text[4:6]), int(text[6:]))
        except ValueError:
            return ""
        return text
    try:
        parsed = DA(text)  # an ACR-NEMA "2026.01.01" is still a date
    except (ValueError, TypeError, OverflowError):
        return ""
    return parsed.strftime("%Y%m%d") if isinstance(parsed, datetime.date) else ""


def _time(value: object) -> str:
    text = str(value).strip()
    if _STRICT_TM.match(text):
        return text
    try:
        parsed = TM(text)
    except (ValueError, TypeError, OverflowError):
        return ""
    if not isinstance(parsed, datetime.time):
        return ""
    fraction = f".{parsed.microsecond:06d}" if parsed.microsecond else ""
    return parsed.strftime("%H%M%S") + fraction


def _person_name(value: object, output: list[str]) -> str | PersonName:
    text = str(value)
    groups = text.split("=")
    if len(groups) <= _PN_GROUPS and all(
        group.count("^") < _PN_COMPONENTS and _group_length(group, output) <= _MAX_BYTES["PN"]
        for group in groups
    ):
        return value if isinstance(value, PersonName | str) else text
    return "=".join(_fitted_group(group, output) for group in groups[:_PN_GROUPS])


def _fitted_group(group: str, output: list[str]) -> str:
    """A PN component group of at most five components (the rest joined to the fifth with
    spaces) cut to 64 bytes from its longest components, so that every component (and caret)
    stays: a name cut to its family name alone reads as another form."""
    limit = _MAX_BYTES["PN"]
    components = group.split("^")
    if len(components) > _PN_COMPONENTS:
        last = _PN_COMPONENTS - 1
        components = [*components[:last], " ".join(c for c in components[last:] if c)]
    while _group_length("^".join(components), output) > limit:
        longest = max(range(len(components)), key=lambda index: len(components[index]))
        if not components[longest]:
            return group[:limit]  # carets alone are too many
        components[longest] = components[longest][:-1]
    return "^".join(components)


# --- character sets -------------------------------------------------------------------------


def _texts(dataset: pydicom.Dataset) -> Iterator[str]:
    """Every text value of *dataset*, nested ones included."""
    for element in dataset:
        if element.VR == "SQ":
            for item in element.value or ():
                yield from _texts(item)
        elif element.VR in _TEXT_VRS and element.value is not None:
            value = element.value
            for text in value if isinstance(value, MultiValue | list) else [value]:
                if text is not None:
                    yield str(text)


def _encodes(charset: tuple[str, ...], texts: Iterable[str]) -> bool:
    """Whether every character of *texts* is in one of *charset*'s repertoires."""
    codecs = ["ascii"] + [python_encoding[term] for term in charset if term not in _DEFAULT_TERMS]
    for text in texts:
        for char in set(text):
            if not any(_encodable(char, codec) for codec in codecs):
                return False
    return True


def _encodable(char: str, codec: str) -> bool:
    try:
        char.encode(codec)
    except (UnicodeError, LookupError):
        return False
    return True
