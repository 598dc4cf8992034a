"""DICOM objects in and out, without the network: intake checks, series to volume, the fused Secondary Capture series, the Spatial Registration object, character sets."""
