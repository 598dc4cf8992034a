"""Rigid multimodal registration (``rigid``) and how far to trust its result (``quality``).

``rigid`` moves the overlay onto the base with Mattes mutual information;
``quality`` measures the result (overlap, similarity, sharpness of the
optimum, a left-right mirror test) and draws the check sheet an operator
looks at.  Both take SimpleITK images and return plain values.
"""

from fusion.registration.quality import QualityThresholds, RegistrationQuality, assess_registration, check_sheet
from fusion.registration.rigid import (
    RegistrationError,
    RegistrationParams,
    RegistrationResult,
    register_rigid,
    resample_onto,
)

__all__ = [
    "QualityThresholds", "RegistrationError", "RegistrationParams", "RegistrationQuality", "RegistrationResult",
    "assess_registration", "check_sheet", "register_rigid", "resample_onto",
]
