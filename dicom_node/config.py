"""The node's one configuration object, read from TOML and validated before anything starts.

Every knob an operator may turn lives here, with its default and its reason;
nothing else in ``dicom_node`` reads environment variables or files for
settings.  ``fusion-node init-config`` writes ``EXAMPLE_TOML`` (below), which
documents each key.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # default character repertoire, no backslash


class ConfigError(ValueError):
    """The configuration is unusable; the message names the key and what to change."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_ae(value: str) -> str:
    if not AE_TITLE.match(value) or not value.strip():
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable characters, no backslash)")
    return value


class NodeConfig(_Model):
    ae_title: str = "FUSIONNODE"
    host: str = "0.0.0.0"
    #: 0 = any free port (the demo and tests use it; the bound port is logged)
    port: int = Field(11112, ge=0, le=65535)
    #: calling AE titles allowed to associate; empty = anyone
    allowed_callers: list[str] = []
    max_associations: int = Field(10, ge=1)
    #: seconds without traffic before an association is aborted
    network_timeout_s: float = Field(60.0, gt=0)

    _ae = field_validator("ae_title")(_check_ae)


class StorageConfig(_Model):
    #: received instances, derived output and the work area live below this folder
    root: Path = Path("fusion-node-data")
    #: SQLite index, job queue and outbox; default ``<root>/node.sqlite``
    database: Path | None = None

    @property
    def database_path(self) -> Path:
        return self.database or self.root / "node.sqlite"


class SettleConfig(_Model):
    #: a series with no new instance for this long is complete
    quiet_seconds: float = Field(30.0, gt=0)
    #: how often the settle sweep looks at open series
    sweep_interval_s: float = Field(2.0, gt=0)
    #: finish early when a series announces its size (ImagesInAcquisition) and all arrived
    use_announced_count: bool = True


class Destination(_Model):
    name: str
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)

    _ae = field_validator("ae_title")(_check_ae)


class SeriesSelector(_Model):
    #: DICOM Modality values accepted, e.g. ["MR"] or ["PT", "NM"]
    modality: list[str]
    #: regular expression searched in SeriesDescription (case-insensitive); empty = any
    description: str = ""
    min_instances: int = Field(1, ge=1)

    @field_validator("description")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"description is not a valid regular expression: {exc}") from exc
        return v

    @field_validator("modality")
    @classmethod
    def _upper(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("name at least one modality")
        return [m.upper() for m in v]


class QualityConfig(_Model):
    """Limits of an acceptable registration (fusion.registration_quality.QualityThresholds; docs/registration.md)."""

    #: least overlap of the two volumes' supports, |F & M| / min(|F|, |M|)
    min_overlap: float = Field(0.5, ge=0, le=1)
    #: least normalised mutual information (entropy correlation coefficient) after registration
    min_similarity: float = Field(0.12, ge=0, le=1)
    #: least relative similarity drop when the result is moved 8 mm / turned 6 deg (a peak, not a plateau)
    min_sharpness: float = Field(0.10, ge=0, le=1)
    #: largest plausible rotation between the two series (degrees)
    max_rotation_deg: float = Field(30.0, gt=0)
    #: largest plausible optimiser travel from the starting alignment, fraction of the smaller volume diagonal
    max_travel_fraction: float = Field(0.25, gt=0)
    #: compare with the overlay mirrored left-right (a flipped series is never fixed by the optimiser)
    check_flip: bool = True
    #: the mirrored overlay must fit better by more than this similarity to count as flipped
    flip_margin: float = Field(0.03, ge=0)


class RegistrationConfig(_Model):
    enabled: bool = True
    #: fraction of voxels sampled by the Mattes MI metric
    sampling: float = Field(0.05, gt=0, le=1)
    histogram_bins: int = Field(50, ge=8)
    #: pyramid on the 2 mm working grid (fusion.registration.RegistrationParams.working_spacing_mm)
    shrink_factors: list[int] = [4, 2, 1]
    #: Gaussian sigma per level in mm: about half the level's voxel size, 1.5 at 2 mm (docs/registration.md)
    smoothing_sigmas: list[float] = [4.0, 2.0, 1.5]
    #: most optimiser iterations per level (500: a 9 deg + 33 mm move of the real CIRS CT needs ~300 at 8 mm)
    iterations: int = Field(500, ge=1)
    seed: int = 20261122
    #: a registration outside the quality limits: "fail" the job with the reason, or "warn" = send the fusion
    #: with "CHECK REG: ..." leading its Series Description (never silently)
    on_poor_quality: Literal["fail", "warn"] = "fail"
    quality: QualityConfig = QualityConfig()


class Pipeline(_Model):
    name: str
    #: the series whose grid and study the fused series belongs to
    base: SeriesSelector
    #: the series registered and resampled onto the base
    overlay: SeriesSelector
    #: how base and overlay must belong together: same study, same patient, or
    #: "rule" = the selectors alone decide (e.g. a phantom scanned under two IDs)
    match: Literal["study", "patient", "rule"] = "study"
    #: a settled series whose partner has not settled after this long is given up (logged)
    partner_timeout_s: float = Field(3600.0, gt=0)
    destinations: list[str] = []
    #: DMF exposures; empty = the default for the non-MR modality (fusion.api.DEFAULT_TRIOS)
    trio: list[str] = []
    feature_source: Literal["vgg", "image"] = "vgg"
    #: CT window as [centre, width] in HU; empty = from the header, else a brain window
    ct_window: list[float] = []
    registration: RegistrationConfig = RegistrationConfig()

    @field_validator("trio")
    @classmethod
    def _trio(cls, v: list[str]) -> list[str]:
        from fusion.methods import available

        v = [m.lower() for m in v]
        unknown = [m for m in v if m not in available()]
        if unknown:
            raise ValueError(f"unknown fusion method(s) {unknown}; available: {', '.join(available())}")
        if v and len(v) < 2:
            raise ValueError("a trio names at least two methods (or none, for the default)")
        return v

    @field_validator("ct_window")
    @classmethod
    def _window(cls, v: list[float]) -> list[float]:
        if v and (len(v) != 2 or v[1] <= 0):
            raise ValueError("ct_window is [centre, width] with width > 0")
        return v


class OutboxConfig(_Model):
    max_attempts: int = Field(6, ge=1)
    backoff_initial_s: float = Field(5.0, gt=0)
    backoff_max_s: float = Field(600.0, gt=0)


class NodeSettings(_Model):
    node: NodeConfig = NodeConfig()
    storage: StorageConfig = StorageConfig()
    settle: SettleConfig = SettleConfig()
    #: prefix for every UID the node creates; get your organisation's own root
    uid_root: str = "1.2.826.0.1.3680043.8.498."
    destinations: list[Destination] = []
    pipelines: list[Pipeline] = []
    outbox: OutboxConfig = OutboxConfig()
    #: parallel fusion jobs (each uses the GPU or all cores)
    workers: int = Field(1, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("uid_root")
    @classmethod
    def _uid_root(cls, v: str) -> str:
        if not re.fullmatch(r"(0|[1-9]\d*)(\.(0|[1-9]\d*))*\.", v) or len(v) > 40:
            raise ValueError("uid_root is dotted digits ending in '.', at most 40 characters (e.g. '1.2.826.0.1.3680043.8.498.')")
        return v

    @model_validator(mode="after")
    def _references(self) -> "NodeSettings":
        names = [d.name for d in self.destinations]
        if len(set(names)) != len(names):
            raise ValueError("destination names must be unique")
        pnames = [p.name for p in self.pipelines]
        if len(set(pnames)) != len(pnames):
            raise ValueError("pipeline names must be unique")
        for p in self.pipelines:
            for d in p.destinations:
                if d not in names:
                    raise ValueError(f"pipeline {p.name!r} sends to unknown destination {d!r}; define it under [[destinations]]")
        return self

    def destination(self, name: str) -> Destination:
        for d in self.destinations:
            if d.name == name:
                return d
        raise KeyError(name)


def load_config(path: Path) -> NodeSettings:
    """Read and validate a TOML file; relative storage paths are taken from the file's folder."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path} (write an example with `fusion-node init-config {path}`)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(raw, base_dir=Path(path).resolve().parent, source=str(path))


def parse_config(raw: dict, base_dir: Path | None = None, source: str = "config") -> NodeSettings:
    try:
        cfg = NodeSettings.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{source}: {problems}") from None
    if base_dir is not None:
        storage = cfg.storage
        root = storage.root if storage.root.is_absolute() else base_dir / storage.root
        db = storage.database
        if db is not None and not db.is_absolute():
            db = base_dir / db
        cfg = cfg.model_copy(update={"storage": StorageConfig(root=root, database=db)})
    return cfg


EXAMPLE_TOML = """\
# dicom-fusion-node configuration. Every key is optional unless marked required;
# the value shown is the default.

# Prefix of every UID the node creates (fused series, instances, REG objects).
# Replace with your organisation's registered root.
uid_root = "1.2.826.0.1.3680043.8.498."
# Fusion jobs run at once; each one uses the GPU if there is one, else all cores.
workers = 1
# auto = GPU when CuPy sees one, else CPU
device = "auto"

[node]
ae_title = "FUSIONNODE"
host = "0.0.0.0"
port = 11112
# Calling AE titles allowed to send; empty list = anyone.
allowed_callers = []
max_associations = 10
network_timeout_s = 60

[storage]
# Received and derived instances, relative to this file's folder.
root = "fusion-node-data"
# database = "fusion-node-data/node.sqlite"

[settle]
# A series is complete after this many seconds without a new instance ...
quiet_seconds = 30
sweep_interval_s = 2
# ... or as soon as all images it announces (ImagesInAcquisition) have arrived.
use_announced_count = true

[outbox]
max_attempts = 6
backoff_initial_s = 5
backoff_max_s = 600

# Where fused series go. Add one block per PACS or workstation.
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 4242

# A pipeline pairs a base series with an overlay series and fuses them.
[[pipelines]]
name = "mr-ct"
# study | patient | rule (rule = the selectors alone decide; use for phantoms
# or outside studies registered under another patient ID)
match = "study"
partner_timeout_s = 3600
destinations = ["pacs"]
# DMF exposures; [] = default per modality (CT: cbf,tif,wls; PET/SPECT: adf,cbf,tif; docs/quality.md)
trio = []
feature_source = "vgg"
# CT window [centre, width] in HU; empty = from the CT header, else brain (40, 80)
ct_window = []

[pipelines.base]
modality = ["CT"]
description = ""       # regular expression on SeriesDescription, case-insensitive
min_instances = 10

[pipelines.overlay]
modality = ["MR"]
description = ""
min_instances = 10

[pipelines.registration]
enabled = true
sampling = 0.05
histogram_bins = 50
# pyramid levels on a 2 mm working grid (8, 4, 2 mm voxels); sigmas in mm
shrink_factors = [4, 2, 1]
smoothing_sigmas = [4.0, 2.0, 1.5]
iterations = 500
seed = 20261122
# A registration outside the limits below: "fail" the job (the operator sees why)
# or "warn" (send the fusion with "CHECK REG: ..." leading its series description).
on_poor_quality = "fail"

[pipelines.registration.quality]
min_overlap = 0.5           # share of the smaller object lying on the other
min_similarity = 0.12       # normalised mutual information after registration
min_sharpness = 0.10        # similarity drop 8 mm / 6 deg away from the result
max_rotation_deg = 30.0
max_travel_fraction = 0.25  # optimiser travel / smaller volume diagonal
check_flip = true           # compare with the overlay mirrored left-right
flip_margin = 0.03
"""
