"""The DICOM service around ``fusion``: receive, pair, register, fuse, send (docs/architecture.md)."""

__version__ = "0.1.0"
