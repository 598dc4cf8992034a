"""The DICOM service around ``fusion``: receive, pair, register, fuse, send (see DESIGN.md)."""

__version__ = "0.1.0"
