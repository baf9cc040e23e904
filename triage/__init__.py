"""msk-triage: a PACS worklist triage daemon for upper-extremity radiographs."""

__version__ = "0.1.0"

#: The Manufacturer of every object msk-triage writes; instances carrying it are its own output.
MANUFACTURER = "msk-triage"
