"""Synthetic data for tests, benchmarks, demos and training: radiograph phantoms
(:mod:`triage.testing.phantom`), DICOM studies, files and training layouts
(:mod:`triage.testing.synth`), and such files recorded as received
(:mod:`triage.testing.received`). Nothing here is imported by the daemon."""
