"""The base of every error ``fusion`` raises on purpose; the message says what to do.

Subclasses live where they are raised: ``RegistrationError`` (registration),
``WeightsUnavailableError`` (weights), ``DeviceUnavailableError`` (backend),
``ModelUnavailableError`` (methods.mdlatlrr).
"""


class FusionError(RuntimeError):
    """A failure of the image science that a caller should report, not retry blindly."""
