"""The SOP classes and transfer syntaxes the listener accepts, and its DIMSE statuses."""

from __future__ import annotations

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
VERIFICATION = "1.2.840.10008.1.1"

#: Image storage classes accepted without configuration.
DEFAULT_STORAGE_CLASSES: tuple[str, ...] = (
    CR_IMAGE_STORAGE,
    DX_FOR_PRESENTATION,
    DX_FOR_PROCESSING,
    SECONDARY_CAPTURE,
)

#: Objects that travel with a radiograph study but are not views: msk-triage's own SR and
#: parametric maps, and others' reports, dose reports, key objects and presentation states.
#: A PACS re-sending a whole study (its results included) must not fail on them, so they are
#: accepted, acknowledged and not stored.
ACKNOWLEDGED_NOT_STORED: tuple[str, ...] = (
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR (msk-triage's SR)
    "1.2.840.10008.5.1.4.1.1.88.67",  # X-Ray Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.88.59",  # Key Object Selection
    "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State
    "1.2.840.10008.5.1.4.1.1.30",  # Parametric Map (msk-triage's CAM maps)
)

#: Uncompressed first (most peers propose it), then the common compressed syntaxes, all of
#: which pydicom decodes with the pylibjpeg plugins.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
    RLELossless,
)


class Status:
    """C-STORE response statuses (PS3.4 B.2.3) and the codes msk-triage uses within them."""

    SUCCESS = 0x0000
    #: Refused: SOP class not supported (not one msk-triage stores).
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    #: Refused, out of resources: the spool is under its free-space floor or a write failed.
    OUT_OF_RESOURCES = 0xA700
    #: Refused, out of resources: the store could not record the instance; retry later.
    STORE_UNAVAILABLE = 0xA701
    #: Error: the data set does not match the SOP class (other class, or no image pixels).
    DATASET_MISMATCH = 0xA900
    #: Error: cannot understand — unreadable data set.
    UNREADABLE = 0xC000
    #: Error: cannot understand — a required UID is missing or malformed.
    INVALID_UID = 0xC001
    #: Error: cannot understand — the data set's SOP Instance UID differs from the request's.
    INSTANCE_MISMATCH = 0xC002
