"""DICOM Structured Report of a fundus analysis (TID 1500 in a Comprehensive 3D SR)."""
