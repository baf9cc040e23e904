"""Training (`triage train`) and evaluation (`triage evaluate`) of the MURA DenseNet-169."""
