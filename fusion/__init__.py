"""Image science of dicom-fusion-node: arrays in, arrays out; no DICOM, no network.

Start with :func:`fusion.fuse`.  See ``../shared/DESIGN.md`` for the method.
"""

from fusion.api import DEFAULT_TRIO, DMFResult, dmf_stack, fuse
from fusion.dmf import DMFParams

__all__ = ["fuse", "dmf_stack", "DMFResult", "DMFParams", "DEFAULT_TRIO"]
