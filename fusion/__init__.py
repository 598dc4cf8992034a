"""Image science of dicom-fusion-node: arrays in, arrays out; no DICOM, no network.

Start with :func:`fusion.fuse`.  The method and its equations: ``docs/method.md``.
"""

from fusion.api import DEFAULT_TRIO, DMFResult, dmf_stack, fuse, fusion_methods, resolve_trio
from fusion.dmf import DMFParams

__all__ = ["fuse", "dmf_stack", "DMFResult", "DMFParams", "DEFAULT_TRIO", "fusion_methods", "resolve_trio"]
