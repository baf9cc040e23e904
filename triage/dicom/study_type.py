"""Which MURA study type a study is, and which of its views may be scored.

Headers only (no pixels): the worker reads each instance with ``stop_before_pixels`` and calls
:func:`decide_study`, which

1. checks each view (:func:`check_view`): only radiographs are scored — CR, DX For
   Presentation, and Secondary Captures whose Modality is CR, DX or OT (OT only when the
   capture's own BodyPartExamined, SeriesDescription or ProtocolName names an upper-extremity
   part, so a scanned requisition filed in a wrist study is not scored). DX For Processing (raw
   detector data), scanned documents and drawings, other SOP classes and modalities, and
   msk-triage's own CAM overlays are not;
2. finds each eligible view's type (:func:`detect_study_type`): the first of BodyPartExamined,
   StudyDescription, SeriesDescription and ProtocolName that names any anatomy decides. A part
   outside MURA (chest, knee …) excludes the view; a source naming nothing is passed over. A
   view typed by the study's description is excluded all the same when its own series
   description or protocol names other anatomy (a chest series filed in a hand study);
3. takes the study type by majority over the views that have one (a tie goes to the type of
   the earliest of those views in reading order, :func:`view_order`), and scores every
   eligible view that was not excluded, including views whose own headers name no part or
   another MURA part (a hand view in a wrist study belongs to that study).

A study with no scorable view, or none naming a MURA part, or described as a survey of several
parts (a skeletal survey, whose views each name their own part), gets ``study_type=None`` and
a reason; the worker marks it SKIPPED.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import UID

from triage.dicom.sop import (
    CR_IMAGE_STORAGE,
    DX_FOR_PRESENTATION,
    DX_FOR_PROCESSING,
    SECONDARY_CAPTURE,
)
from triage.logs import identity_values, without_identity
from triage.scoring.result import ModelInfo
from triage.study_types import StudyType

#: Header attributes searched, in order, for the anatomy.
SOURCES: tuple[str, ...] = (
    "BodyPartExamined",
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
)

_TYPE_WORDS: dict[StudyType, tuple[str, ...]] = {
    StudyType.ELBOW: ("ELBOW", "ELBOWS", "ELB", "OLECRANON", "RADIAL HEAD", "RAD HEAD"),
    StudyType.FINGER: (
        "FINGER",
        "FINGERS",
        "FING",
        "FNGR",
        "FNGRS",
        "THUMB",
        "THUMBS",
        "POLLEX",
    ),
    StudyType.FOREARM: (
        "FOREARM",
        "FOREARMS",
        "FORARM",
        "FORE ARM",
        "LOWER ARM",
        "RADIUS ULNA",
        "RADIUS AND ULNA",
        "RAD ULNA",
        "RADIUS",
        "ULNA",
    ),
    StudyType.HAND: ("HAND", "HANDS", "HND", "METACARPAL", "METACARPALS"),
    StudyType.HUMERUS: ("HUMERUS", "HUMERI", "HUMERAL", "HUM", "UPPER ARM", "ARM", "ARMS"),
    StudyType.SHOULDER: (
        "SHOULDER",
        "SHOULDERS",
        "SHLDR",
        "SHLD",
        "GLENOHUMERAL",
        # The shoulder series' own views: the scapula named by them is not a scapula study.
        "SCAPULAR Y",
        "SCAPULA Y",
        "Y SCAPULA",
        "Y SCAPULAR",
        "TRANSSCAPULAR",
        "TRANS SCAPULAR",
        "Y VIEW",
        "OUTLET VIEW",
        "GRASHEY",
    ),
    StudyType.WRIST: (
        "WRIST",
        "WRISTS",
        "WRST",
        "SCAPHOID",
        "SCAPHOIDS",
        "CARPAL",
        "CARPUS",
        "DISTAL RADIUS",
        "ULNAR DEVIATION",
        "ULNAR DEV",
        "RADIAL DEVIATION",
        "RADIAL DEV",
    ),
}

#: Words for an upper-extremity part that are also used for the foot: they count only when no
#: lower-limb word is in the same text.
_AMBIGUOUS_WORDS: dict[str, StudyType] = {
    "DIGIT": StudyType.FINGER,
    "DIGITS": StudyType.FINGER,
    "PHALANX": StudyType.FINGER,
    "PHALANGES": StudyType.FINGER,
    "NAVICULAR": StudyType.WRIST,
}
_LOWER_LIMB = frozenset(
    {
        "FOOT",
        "FEET",
        "FOREFOOT",
        "MIDFOOT",
        "HINDFOOT",
        "TOE",
        "TOES",
        "ANKLE",
        "ANKLES",
        "HEEL",
        "CALCANEUS",
        "CALCANEUM",
        "OS CALCIS",
        "TARSAL",
        "TARSALS",
        "METATARSAL",
        "METATARSALS",
        "HALLUX",
        "LEG",
    }
)
#: Words of a study description that make the study something other than one of MURA's seven
#: (each view of a skeletal survey names its own part: a hand, a humerus …).
_NOT_A_MURA_STUDY = frozenset({"SURVEY", "BABYGRAM", "BABYGRAMS"})
#: Anatomy outside MURA: naming it first rules a view out.
_OTHER_PARTS = frozenset(
    {
        "CHEST",
        "THORAX",
        "LUNG",
        "LUNGS",
        "RIB",
        "RIBS",
        "STERNUM",
        "CLAVICLE",
        "CLAVICLES",
        "SCAPULA",
        "KNEE",
        "KNEES",
        "PATELLA",
        "PELVIS",
        "HIP",
        "HIPS",
        "SACRUM",
        "COCCYX",
        "SI JOINTS",
        "FEMUR",
        "TIBIA",
        "FIBULA",
        "TIB FIB",
        "LEGS",
        "SPINE",
        "CSPINE",
        "TSPINE",
        "LSPINE",
        "CERVICAL",
        "THORACIC",
        "LUMBAR",
        "SKULL",
        "HEAD",
        "FACE",
        "FACIAL",
        "SINUS",
        "SINUSES",
        "MANDIBLE",
        "ORBIT",
        "ORBITS",
        "NECK",
        "ABDOMEN",
        # Not "ABD": in a shoulder series it is abduction ("AP ABD ER"), the common sense here.
        "KUB",
        "BREAST",
        "MAMMO",
        "MAMMOGRAPHY",
        "DENTAL",
        "TEETH",
        *_LOWER_LIMB,
    }
)
#: Prefixes and suffixes glued to a part ("XRWRIST", "LTHAND", "WRISTRT") that are not anatomy.
_GLUED_PREFIXES = ("XR", "DX", "CR", "BILAT", "LEFT", "RIGHT", "LT", "RT", "L", "R")
_GLUED_SUFFIXES = ("BILAT", "LEFT", "RIGHT", "LT", "RT", "L", "R")

_PHRASES: dict[tuple[str, ...], StudyType | None] = {}
for _type, _words in _TYPE_WORDS.items():
    for _word in _words:
        _PHRASES[tuple(_word.split())] = _type
for _word in _OTHER_PARTS:
    _PHRASES[tuple(_word.split())] = None
_MAX_PHRASE = max(len(p) for p in _PHRASES)
_SINGLE_WORDS = frozenset(p[0] for p in _PHRASES if len(p) == 1) | frozenset(_AMBIGUOUS_WORDS)

#: Secondary Capture conversion types (PS3.3 C.8.6.1) that are never a radiograph.
_NOT_RADIOGRAPH_CONVERSIONS = {
    "SD": "a scanned document",
    "DRW": "a drawing",
    "SYN": "a synthetic image",
}

#: The manufacturer msk-triage writes into its own outputs (CAM overlays, SRs).
OWN_MANUFACTURER = ModelInfo.manufacturer


@dataclass(frozen=True)
class StudyTypeDecision:
    """The study type found in some headers (None when none), and why."""

    study_type: StudyType | None
    reason: str
    #: The attribute that decided ("BodyPartExamined" …), None when nothing named a part.
    source: str | None = None
    #: True when a source named anatomy outside MURA (the view is then not scored).
    other_anatomy: bool = False


@dataclass(frozen=True)
class Eligibility:
    """Whether one view may be scored, and why not."""

    eligible: bool
    reason: str = ""


@dataclass(frozen=True)
class ViewDecision:
    """One view of a study: scored or not, its own study type, and the reason."""

    sop_instance_uid: str
    scored: bool
    study_type: StudyType | None
    reason: str


@dataclass(frozen=True)
class StudyDecision:
    """A study's type (None → SKIPPED), why, and what happens to each view."""

    study_type: StudyType | None
    reason: str
    views: tuple[ViewDecision, ...]

    @property
    def scored_uids(self) -> tuple[str, ...]:
        """SOP Instance UIDs of the views to score, in the order given."""
        return tuple(view.sop_instance_uid for view in self.views if view.scored)

    @property
    def skipped_views(self) -> tuple[ViewDecision, ...]:
        """The views that are not scored (each with its reason)."""
        return tuple(view for view in self.views if not view.scored)


def _tokens(text: str) -> list[str]:
    upper = text.upper()
    # "HAND3V" → "HAND 3V"; punctuation ("FINGER(S)", "R-WRIST", "RAD/ULNA") → spaces.
    upper = re.sub(r"(?<=[A-Z])(?=[0-9])|(?<=[0-9])(?=[A-Z])", " ", upper)
    words = re.split(r"[^A-Z0-9]+", upper)
    return [_unglue(word) for word in words if word]


def _unglue(word: str) -> str:
    """'XRWRIST' → 'WRIST', 'LTHAND' → 'HAND', 'WRISTRT' → 'WRIST'; other words unchanged."""
    if word in _SINGLE_WORDS:
        return word
    for prefix in _GLUED_PREFIXES:
        rest = word.removeprefix(prefix)
        if rest != word and len(rest) >= 3:
            found = _unglue(rest)
            if found in _SINGLE_WORDS:
                return found
    for suffix in _GLUED_SUFFIXES:
        rest = word.removesuffix(suffix)
        if len(suffix) == 1 and rest.endswith("A"):
            continue  # an adjective (ULNAR, SCAPULAR, TIBIAL), not ULNA or SCAPULA + R(ight)
        if rest != word and rest in _SINGLE_WORDS:
            return rest
    return word


def _names_lower_limb(text: str) -> bool:
    tokens = _tokens(text)
    return any(
        " ".join(tokens[i : i + 2]) in _LOWER_LIMB or tokens[i] in _LOWER_LIMB
        for i in range(len(tokens))
    )


def parse_anatomy(text: str, lower_limb: bool = False) -> tuple[StudyType | None, str | None]:
    """The anatomy one header text names: (type, word) for a MURA part, (None, word) for
    another part, (None, None) when it names none.

    Within one text a MURA part wins over other anatomy, and the first one in reading order
    over later ones ("XR HAND AND WRIST" → hand). Words shared with the foot ("DIGIT",
    "PHALANGES") name a finger only when no lower-limb word is in the text, or, with
    *lower_limb*, in another text of the same view.
    """
    tokens = _tokens(text)
    lower_limb = lower_limb or _names_lower_limb(text)
    first_other: str | None = None
    index = 0
    while index < len(tokens):
        for length in range(min(_MAX_PHRASE, len(tokens) - index), 0, -1):
            phrase = tuple(tokens[index : index + length])
            if phrase in _PHRASES:
                found = _PHRASES[phrase]
                if found is not None:
                    return found, " ".join(phrase)
                first_other = first_other or " ".join(phrase)
                index += length
                break
        else:
            token = tokens[index]
            if token in _AMBIGUOUS_WORDS and not lower_limb:
                return _AMBIGUOUS_WORDS[token], token
            index += 1
    return None, first_other


def detect_study_type_from(
    body_part: str | None = None,
    study_description: str | None = None,
    series_description: str | None = None,
    protocol_name: str | None = None,
) -> StudyTypeDecision:
    """The study type named by these header values (see :func:`detect_study_type`)."""
    values = (body_part, study_description, series_description, protocol_name)
    lower_limb = any(_names_lower_limb(str(value or "")) for value in values)
    for source, value in zip(SOURCES, values, strict=True):
        text = str(value or "").strip()
        if not text:
            continue
        study_type, word = parse_anatomy(text, lower_limb)
        if study_type is not None:
            return StudyTypeDecision(
                study_type, f"{source} {text!r} names the {study_type.display}", source
            )
        if word is not None:
            return StudyTypeDecision(
                None,
                f"not an upper-extremity radiograph: {source} {text!r} names {word.lower()}",
                source,
                other_anatomy=True,
            )
    named = [f"{s} {str(v)!r}" for s, v in zip(SOURCES, values, strict=True) if v]
    if not named:
        return StudyTypeDecision(None, "no body part or description in the headers")
    return StudyTypeDecision(None, "no upper-extremity part named in " + ", ".join(named))


def detect_study_type(ds: Dataset) -> StudyTypeDecision:
    """The MURA study type a header names: BodyPartExamined first, then StudyDescription,
    SeriesDescription, ProtocolName. The first of them that names any anatomy decides; anatomy
    outside MURA gives ``study_type=None`` with ``other_anatomy=True``."""
    return detect_study_type_from(*(_text(ds, keyword) for keyword in SOURCES))


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value)


def check_view(ds: Dataset) -> Eligibility:
    """Whether a view is a radiograph msk-triage may score (headers only).

    Scored: CR; DX For Presentation; Secondary Capture with Modality CR or DX, or OT when the
    capture's own headers (not the study description) name an upper-extremity part. Not
    scored: DX For Processing, captures of scanned documents, drawings or synthetic images,
    other SOP classes or modalities, and msk-triage's own outputs.
    """
    sop_class = _text(ds, "SOPClassUID").strip()
    modality = _text(ds, "Modality").strip().upper()
    if sop_class == DX_FOR_PROCESSING:
        return Eligibility(False, "DX For Processing: raw detector data, not an image to read")
    if _text(ds, "Manufacturer").strip() == OWN_MANUFACTURER:
        return Eligibility(False, f"an output of {OWN_MANUFACTURER} itself")
    if sop_class in (CR_IMAGE_STORAGE, DX_FOR_PRESENTATION):
        if modality in ("CR", "DX", ""):
            return Eligibility(True)
        return Eligibility(False, f"modality {modality} is not a radiograph")
    if sop_class == SECONDARY_CAPTURE:
        conversion = _text(ds, "ConversionType").strip().upper()
        if conversion in _NOT_RADIOGRAPH_CONVERSIONS:
            what = _NOT_RADIOGRAPH_CONVERSIONS[conversion]
            return Eligibility(False, f"Secondary Capture of {what} (ConversionType {conversion})")
        if modality in ("CR", "DX"):
            return Eligibility(True)
        if modality == "OT":
            # OT captures are often scanned requisitions filed in the study: the study's own
            # description does not make one a radiograph, only the capture's own headers do.
            own = detect_study_type_from(
                _text(ds, "BodyPartExamined"),
                None,
                _text(ds, "SeriesDescription"),
                _text(ds, "ProtocolName"),
            )
            if own.study_type is not None:
                return Eligibility(True)
            return Eligibility(
                False, "Secondary Capture (OT) whose own headers name no upper-extremity part"
            )
        return Eligibility(False, f"Secondary Capture of modality {modality or '(none)'}")
    name = UID(sop_class).name if sop_class else "(none)"
    return Eligibility(False, f"SOP class {name} is not a radiograph")


def _summary(reasons: Iterable[str]) -> str:
    counts = Counter(reasons)
    return "; ".join(f"{n}× {reason}" if n > 1 else reason for reason, n in counts.items())


def patients_in(views: Iterable[Dataset]) -> int:
    """How many patients (distinct non-empty PatientIDs) the views of one study belong to:
    more than one is a StudyInstanceUID reused by a modality or RIS, never one study."""
    return len({_text(ds, "PatientID").strip() for ds in views} - {""})


def _survey(views: Sequence[Dataset]) -> str:
    """Why the study is not one of MURA's seven whatever its views name (a skeletal
    survey), or ''."""
    for ds in views:
        description = _text(ds, "StudyDescription").strip()
        if any(token in _NOT_A_MURA_STUDY for token in _tokens(description)):
            return (
                f"not an upper-extremity radiograph: StudyDescription {description!r} names "
                "a survey of several parts"
            )
    return ""


def view_order(ds: Dataset) -> tuple[int, int, str]:
    """The sort key that puts a study's views in reading order before :func:`decide_study`:
    Series Number, Instance Number (0 when absent or not a number), then SOPInstanceUID.

    The worker and the training/evaluation loader both sort by it, so that a tie in the
    study-type majority goes to the same view in both: in the order the instances arrived,
    the worker typed a tied study (and chose its threshold) by whichever view the PACS
    happened to send first, unlike ``triage evaluate`` on the same files.
    """

    def number(keyword: str) -> int:
        try:
            return int(ds.get(keyword, 0) or 0)
        except (TypeError, ValueError):
            return 0

    return number("SeriesNumber"), number("InstanceNumber"), _text(ds, "SOPInstanceUID")


def decide_study(
    views: Sequence[Dataset], covered: Iterable[StudyType] | None = None
) -> StudyDecision:
    """Decide a study's type and which views to score from their headers.

    *views* in reading order (sorted by :func:`view_order`); ties in the majority go to the
    earliest. *covered* (the model card's study types) turns a type the
    model was not trained for into a skip.

    The reasons quote descriptions, which sites sometimes fill with the patient's name or
    the accession number; they are logged and stored, so those values are withheld there.
    """
    decision = _decide(views, covered)
    withheld = identity_values(views)
    if not withheld:
        return decision
    return StudyDecision(
        decision.study_type,
        without_identity(decision.reason, withheld),
        tuple(
            dataclasses.replace(view, reason=without_identity(view.reason, withheld))
            for view in decision.views
        ),
    )


def _decide(views: Sequence[Dataset], covered: Iterable[StudyType] | None) -> StudyDecision:
    survey = _survey(views)
    if survey:
        decisions = tuple(
            ViewDecision(_text(ds, "SOPInstanceUID"), False, None, survey) for ds in views
        )
        return StudyDecision(None, f"no scorable view: {survey}", decisions)
    decisions: list[ViewDecision] = []
    candidates: list[tuple[int, StudyType | None]] = []
    for position, ds in enumerate(views):
        uid = _text(ds, "SOPInstanceUID")
        eligibility = check_view(ds)
        if not eligibility.eligible:
            decisions.append(ViewDecision(uid, False, None, eligibility.reason))
            continue
        found = detect_study_type(ds)
        if found.source == "StudyDescription":
            # The study's words typed the view: its own series or protocol may say it is not
            # one of them ("CHEST PA" in an "XR HAND" study, feet in "HANDS AND FEET").
            own = detect_study_type_from(
                None, None, _text(ds, "SeriesDescription"), _text(ds, "ProtocolName")
            )
            if own.other_anatomy:
                found = own
        if found.other_anatomy:
            decisions.append(ViewDecision(uid, False, None, found.reason))
            continue
        decisions.append(ViewDecision(uid, True, found.study_type, found.reason))
        candidates.append((position, found.study_type))

    if not candidates:
        reason = "no scorable view: " + (_summary(d.reason for d in decisions) or "no views")
        return StudyDecision(None, reason, tuple(decisions))
    typed = [(position, t) for position, t in candidates if t is not None]
    if not typed:
        reasons = _summary(d.reason for d in decisions if d.scored)
        return StudyDecision(None, f"no upper-extremity part named: {reasons}", tuple(decisions))

    votes = Counter(t for _, t in typed)
    best = max(votes.values())
    # The earliest view among the most-voted types breaks a tie.
    study_type = next(t for _, t in typed if votes[t] == best)
    if len(votes) == 1:
        reason = f"{study_type.value}: {len(typed)} of {len(typed)} typed views agree"
    else:
        others = ", ".join(f"{t.value} {n}" for t, n in votes.items() if t is not study_type)
        reason = f"{study_type.value}: {best} of {len(typed)} typed views (others: {others})"
    if covered is not None and study_type not in set(covered):
        why = f"the model does not cover {study_type.value}"
        skipped = tuple(
            ViewDecision(d.sop_instance_uid, False, d.study_type, why) if d.scored else d
            for d in decisions
        )
        return StudyDecision(None, f"{why} ({reason})", skipped)
    return StudyDecision(study_type, reason, tuple(decisions))


__all__ = [
    "OWN_MANUFACTURER",
    "SOURCES",
    "Eligibility",
    "StudyDecision",
    "StudyTypeDecision",
    "ViewDecision",
    "check_view",
    "decide_study",
    "detect_study_type",
    "detect_study_type_from",
    "parse_anatomy",
    "patients_in",
    "view_order",
]
