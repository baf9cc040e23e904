"""Synthetic data for tests, benchmarks, demos and training: radiograph phantoms
(:mod:`triage.testing.phantom`) and DICOM studies, files and training layouts
(:mod:`triage.testing.synth`). Nothing here is imported by the daemon."""
