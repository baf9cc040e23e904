"""DICOM networking and objects: listener, SOP classes, (later) sender, SR and SC builders."""
