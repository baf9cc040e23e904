"""msk-triage: a PACS worklist triage daemon for upper-extremity radiographs."""

__version__ = "0.1.0"
