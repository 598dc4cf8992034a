"""The node's one configuration object, read from TOML and validated before anything starts.

Every knob an operator may turn lives here, with its default and its reason;
nothing else in ``dicom_node`` reads environment variables or files for
settings.  ``fusion-node init-config`` writes ``EXAMPLE_TOML`` (below), which
documents each key.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from dicom_node.errors import NodeError

AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # default character repertoire, no backslash


class ConfigError(NodeError, ValueError):
    """The configuration is unusable; the message names the key and what to change."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_ae(value: str) -> str:
    if not AE_TITLE.match(value) or not value.strip():
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable characters, no backslash)")
    return value


def _check_optional_ae(value: str | None) -> str | None:
    return None if value is None else _check_ae(value).strip()


def _check_ae_list(values: list[str]) -> list[str]:
    return [_check_ae(v).strip() for v in values]


def _check_networks(values: list[str]) -> list[str]:
    """IP addresses or CIDR networks, IPv4 or IPv6; a network with host bits set is a typo, not a wish."""
    out = []
    for v in values:
        try:
            out.append(str(ipaddress.ip_network(v.strip(), strict=True)))
        except ValueError as exc:
            raise ValueError(f"{v!r} is not an IP address or network ({exc}); "
                             "write e.g. '192.168.10.25', '10.0.0.0/8' or 'fd00::/8'") from None
    return out


class NodeTLS(_Model):
    """DICOM TLS listener (PS3.15 Annex B, BCP 195 profiles): a second port beside the plain one.

    Keeping the plain port by default is common PACS practice (modalities
    without TLS keep working on the LAN); ``node.plain_enabled = false``
    leaves only this listener.  Paths are relative to the config file.
    """

    enabled: bool = False
    #: the DICOM TLS well-known port; 0 = any free port (tests)
    port: int = Field(2762, ge=0, le=65535)
    #: PEM certificate (chain) the node presents
    certificate: Path | None = None
    #: PEM private key of that certificate (unencrypted; protect it with file permissions)
    private_key: Path | None = None
    #: PEM file of the CA certificate(s) trusted to sign callers' client certificates
    ca_certificates: Path | None = None
    #: refuse callers without a client certificate signed by ``ca_certificates``
    require_client_certificate: bool = True

    @model_validator(mode="after")
    def _complete(self) -> NodeTLS:
        if self.enabled:
            missing = [k for k in ("certificate", "private_key") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"TLS is enabled but {' and '.join(missing)} is not set; "
                                 "name the node's PEM certificate and private key files")
            if self.require_client_certificate and self.ca_certificates is None:
                raise ValueError("require_client_certificate = true needs ca_certificates "
                                 "(the CA certificate(s) that signed the callers' certificates)")
        return self


class NodeConfig(_Model):
    ae_title: str = "FUSIONNODE"
    host: str = "0.0.0.0"
    #: 0 = any free port (the demo and tests use it; the bound port is logged)
    port: int = Field(11112, ge=0, le=65535)
    #: listen on ``port`` without TLS; false = only the [node.tls] listener answers
    plain_enabled: bool = True
    #: calling AE titles allowed to associate; empty = anyone
    allowed_callers: list[str] = []
    #: peer IP addresses or CIDR networks allowed to associate (IPv4/IPv6); empty = anyone
    allowed_addresses: list[str] = []
    #: reject associations whose Called AE Title is neither ``ae_title`` nor a pipeline's ``ae_title``
    require_called_ae: bool = True
    #: associations accepted at once (plain and TLS together); more are rejected transiently
    max_associations: int = Field(10, ge=1)
    #: seconds without traffic before an association is aborted
    network_timeout_s: float = Field(60.0, gt=0)
    #: seconds a new connection has for its TLS handshake and its A-ASSOCIATE-RQ (PS3.8 ARTIM);
    #: a connection that sends nothing in that time is closed and never holds an association slot
    artim_timeout_s: float = Field(10.0, gt=0)
    #: SIGTERM: stop listening, let open associations finish and the running job reach a stage
    #: boundary for at most this long, then exit (the job is queued again; docs/operations.md)
    shutdown_timeout_s: float = Field(10.0, gt=0)
    tls: NodeTLS = NodeTLS()

    _ae = field_validator("ae_title")(_check_ae)
    _callers = field_validator("allowed_callers")(_check_ae_list)
    _addresses = field_validator("allowed_addresses")(_check_networks)

    @model_validator(mode="after")
    def _listeners(self) -> NodeConfig:
        if not self.plain_enabled and not self.tls.enabled:
            raise ValueError("plain_enabled = false needs [node.tls] enabled = true, or the node would not listen at all")
        if self.plain_enabled and self.tls.enabled and self.port == self.tls.port != 0:
            raise ValueError(f"port and tls.port are both {self.port}; the TLS listener needs its own port (2762 is usual)")
        return self


class StorageConfig(_Model):
    #: received instances, derived output and the work area live below this folder
    root: Path = Path("fusion-node-data")
    #: SQLite index, job queue and outbox; default ``<root>/node.sqlite``
    database: Path | None = None
    #: PostgreSQL instead of the SQLite file, for several node processes sharing one queue
    #: (``postgresql+psycopg://user:password@host:5432/dbname``, docs/scale-out.md); empty = the SQLite file
    database_url: str = ""
    #: this node process's own name when several share one storage root (with ``database_url``): its partial
    #: files, staged series and heartbeat are kept apart under it; empty = the only node on this root
    instance: str = Field("", pattern=r"^[A-Za-z0-9._-]{0,64}$")

    @property
    def database_path(self) -> Path:
        """The SQLite file (also where the heartbeat and backups go beside it, with PostgreSQL too)."""
        return self.database or self.root / "node.sqlite"

    @property
    def database_location(self) -> Path | str:
        """What ``index.db.Database`` opens: the PostgreSQL URL when set, else the SQLite file."""
        return self.database_url or self.database_path

    @field_validator("database_url")
    @classmethod
    def _url(cls, v: str) -> str:
        v = v.strip()
        if v and not v.startswith(("postgresql://", "postgresql+psycopg://")):
            raise ValueError("database_url takes a PostgreSQL URL (postgresql+psycopg://user@host:5432/dbname); "
                             "leave it empty for the embedded SQLite file")
        if v.startswith("postgresql://"):
            v = "postgresql+psycopg://" + v[len("postgresql://"):]  # the driver the node ships with
        return v


class SettleConfig(_Model):
    #: a series with no new instance for this long is complete
    quiet_seconds: float = Field(30.0, gt=0)
    #: how often the settle sweep looks at open series
    sweep_interval_s: float = Field(2.0, gt=0)
    #: finish early when a series announces its size (ImagesInAcquisition) and all arrived
    use_announced_count: bool = True


class DestinationTLS(_Model):
    """Send to this destination over DICOM TLS; the peer's certificate is always verified."""

    #: PEM CA certificate(s) that signed the peer's certificate; unset = the system trust store
    ca_certificates: Path | None = None
    #: PEM client certificate and key, for peers that require one (both or neither)
    certificate: Path | None = None
    private_key: Path | None = None
    #: the peer's certificate must name ``host`` (DNS name or IP address)
    verify_hostname: bool = True

    @model_validator(mode="after")
    def _pair(self) -> DestinationTLS:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("set both certificate and private_key (the client certificate and its key), or neither")
        return self


class DicomDestination(_Model):
    """A DICOM peer reached by C-STORE (a PACS, a workstation); also a possible C-MOVE target."""

    kind: Literal["dicom"] = "dicom"
    name: str
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    #: DICOM TLS to this peer; absent = plain TCP
    tls: DestinationTLS | None = None

    _ae = field_validator("ae_title")(_check_ae)


class DicomWebDestination(_Model):
    """A DICOMweb service reached by STOW-RS (PS3.18 10.5): ``POST <url>/studies``.

    Credentials: ``token`` (HTTP Bearer) or ``username``/``password`` (HTTP
    Basic), or neither.  Prefer ``token_file``/``password_file`` (a file holding
    only the secret, readable by the node's user) over writing secrets here.
    """

    kind: Literal["dicomweb"]
    name: str
    #: base URL of the DICOMweb service, e.g. "https://pacs.example.org/dicom-web" (no trailing /studies)
    url: str
    username: str | None = None
    password: str | None = None
    password_file: Path | None = None
    token: str | None = None
    token_file: Path | None = None
    #: PEM CA certificate(s) that signed the server's certificate (https); unset = the system trust store
    ca_certificates: Path | None = None
    #: seconds for connecting and for each read of the response
    timeout_s: float = Field(60.0, gt=0)
    #: instances per STOW-RS request (one multipart body)
    batch_size: int = Field(50, ge=1)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        v = v.strip().rstrip("/")
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"{v!r} is not an http(s) URL; write e.g. 'http://127.0.0.1:8042/dicom-web'")
        if v.endswith("/studies"):
            raise ValueError("give the DICOMweb base URL without '/studies' (the node appends it)")
        return v

    @model_validator(mode="after")
    def _credentials(self) -> DicomWebDestination:
        basic = self.username is not None or self.password is not None or self.password_file is not None
        bearer = self.token is not None or self.token_file is not None
        if basic and bearer:
            raise ValueError("use either token/token_file (Bearer) or username/password (Basic), not both")
        if (self.password is not None or self.password_file is not None) and self.username is None:
            raise ValueError("a password needs a username")
        if self.password is not None and self.password_file is not None:
            raise ValueError("set password or password_file, not both")
        if self.token is not None and self.token_file is not None:
            raise ValueError("set token or token_file, not both")
        return self


def _destination_kind(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("kind", "dicom"))
    return str(getattr(value, "kind", "dicom"))


#: a destination is chosen by its ``kind`` ("dicom" when absent); the outbox has one sender per kind
Destination = Annotated[
    Annotated[DicomDestination, Tag("dicom")] | Annotated[DicomWebDestination, Tag("dicomweb")],
    Discriminator(_destination_kind),
]


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
    """Limits of an acceptable registration (fusion.registration.quality.QualityThresholds; docs/registration.md)."""

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
    #: the mirrored overlay must fit better by more than this relative advantage (mean of its ECC and gradient
    #: correlation ratios - 1, both orientations registered alike) to count as flipped (docs/registration.md)
    flip_margin: float = Field(0.04, ge=0)


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
    #: the fusion method: "faithful" (default; keeps bone and uptake, docs/fidelity.md), "dmf",
    #: "dmf_paper" (the paper's trios), or any method registered in fusion.methods (one module each)
    method: str = "faithful"
    #: DMF exposures; empty = the default for the non-MR modality (fusion.api.resolve_trio)
    trio: list[str] = []
    feature_source: Literal["vgg", "image"] = "vgg"
    #: CT window as [centre, width] in HU; empty = from the header, else a brain window
    ct_window: list[float] = []
    #: DICOM standard palette (PS3.6 Annex B) for a PET/NM overlay: "hot_iron" or "pet"
    palette: Literal["hot_iron", "pet"] = "hot_iron"
    #: warn (job result, log) when the CT window shows more than this share of the body white or black
    ct_saturation_warning: float = Field(0.5, gt=0, le=1)
    registration: RegistrationConfig = RegistrationConfig()
    #: an extra Called AE Title the node answers to for this pipeline; series sent to it are
    #: fused by this pipeline only from what arrived through it (unset = series sent to the node's own AE title)
    ae_title: str | None = None
    #: calling AE titles / peer addresses allowed to call ``ae_title``, on top of the [node] lists
    allowed_callers: list[str] = []
    allowed_addresses: list[str] = []

    _ae = field_validator("ae_title")(_check_optional_ae)
    _callers = field_validator("allowed_callers")(_check_ae_list)
    _addresses = field_validator("allowed_addresses")(_check_networks)

    @model_validator(mode="after")
    def _access(self) -> Pipeline:
        if self.ae_title is None and (self.allowed_callers or self.allowed_addresses):
            raise ValueError("allowed_callers/allowed_addresses of a pipeline apply to associations called to its "
                             "ae_title; set ae_title, or put the lists under [node]")
        return self

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        from fusion.api import fusion_methods

        v = v.strip().lower()
        if v not in fusion_methods():
            raise ValueError(f"unknown fusion method {v!r}; available: {', '.join(fusion_methods())}")
        return v

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
    """Retries are bounded by time, not by count: a PACS maintenance window must never need an operator."""

    #: keep retrying an item this long after its first failed attempt, then it is dead (24 h)
    retry_for_s: float = Field(86400.0, gt=0)
    #: also dead after this many attempts; 0 = no count limit (``retry_for_s`` alone decides)
    max_attempts: int = Field(0, ge=0)
    #: wait before the second attempt (s); doubles per attempt up to ``backoff_max_s``
    backoff_initial_s: float = Field(5.0, gt=0)
    #: longest wait between two attempts (s): after an outage, delivery resumes at most this long later
    backoff_max_s: float = Field(300.0, gt=0)
    #: a destination failing this long logs ``outbox.destination.down`` once (and ``.up`` when it recovers)
    alert_after_s: float = Field(600.0, gt=0)


class QueryRetrieveConfig(_Model):
    """Query/Retrieve SCP for workstations (dicom_node/qr.py); callers pass the same access checks as senders."""

    #: answer C-FIND, C-GET and C-MOVE on the node's AE titles; false = a pure router (storage only)
    enabled: bool = True
    #: names of [[destinations]] a C-MOVE may send to; empty = every destination.  A C-MOVE to any other
    #: AE title is refused (0xA801): the node never sends patient data to an address a caller made up
    move_destinations: list[str] = []
    #: calling AE titles that may query and retrieve.  Q/R lists every patient the node holds, so callers
    #: are named, not assumed: with allowed_addresses also empty, nobody may (Q/R contexts are rejected)
    allowed_callers: list[str] = []
    #: peer IP addresses or networks that may query and retrieve; a caller must match every list that is set
    allowed_addresses: list[str] = []

    _callers = field_validator("allowed_callers")(_check_ae_list)
    _addresses = field_validator("allowed_addresses")(_check_networks)


class RetentionConfig(_Model):
    """What the node may delete (dicom_node/workflow/retention.py): only what is fused and delivered, or given up."""

    #: run the purge periodically in ``serve``; false = only ``fusion-node purge`` deletes
    enabled: bool = True
    #: how often the node runs the purge (s)
    interval_s: float = Field(600.0, gt=0)
    #: received series whose fusions are done and delivered are kept this long after their last instance (days)
    received_max_age_days: float = Field(7.0, ge=0)
    #: derived (fused, REG) series are kept this long after they were delivered to every destination (days)
    derived_max_age_days: float = Field(7.0, ge=0)
    #: series never fused (unmatched, partner timed out, or their job failed) are kept this long (days)
    unfused_max_age_days: float = Field(14.0, ge=0)
    #: below this share of free disk space, eligible series are purged oldest first regardless of age (percent)
    min_free_percent: float = Field(10.0, ge=0, le=100)
    #: below this share of free disk space, C-STORE is refused with 0xA700 (out of resources) (percent)
    reserve_free_percent: float = Field(3.0, ge=0, le=100)

    @model_validator(mode="after")
    def _order(self) -> RetentionConfig:
        if self.reserve_free_percent > self.min_free_percent:
            raise ValueError("reserve_free_percent must not exceed min_free_percent (the purge watermark), "
                             "or the node refuses studies before it tries to make room")
        return self


class LimitsConfig(_Model):
    """Decoding limits at intake (dicom_node/dicom/validation.py): larger instances are refused with 0xA700.

    The defaults hold every CT, MR, PET and NM image (512-1024 pixels square,
    multi-frame series up to the instance limit) and screen captures up to
    4096 x 4096; the node's peak memory is bounded by about
    ``decode_concurrency x 4 x max_frame_bytes`` above its idle size
    (docs/reliability.md, "Intake: hostile input and memory").
    """

    #: largest frame accepted, in pixels (Rows x Columns); the frame header of a compressed stream is checked too
    max_frame_pixels: int = Field(4096 * 4096, ge=1)
    #: largest decoded frame in bytes (Rows x Columns x SamplesPerPixel x BitsAllocated / 8)
    max_frame_bytes: int = Field(64 << 20, ge=1)
    #: largest received instance (the file as sent) in bytes
    max_instance_bytes: int = Field(1 << 30, ge=1)
    #: largest dataset after inflating a Deflated transfer syntax, in bytes (inflated to disk, never to memory)
    max_inflated_bytes: int = Field(1 << 30, ge=1)
    #: pixel-data decodes running at once over all associations (each frame of each instance is decoded at intake)
    decode_concurrency: int = Field(2, ge=1)
    #: seconds a C-STORE waits for a free decode slot before it is refused with 0xA700 (the sender retries)
    decode_wait_s: float = Field(30.0, gt=0)


class LoggingConfig(_Model):
    """Where the node's log goes and how it reads (dicom_node/logs.py); ``--log-level`` overrides ``level``."""

    #: DEBUG, INFO, WARNING or ERROR
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: "auto" = a human console format on a terminal, JSON lines otherwise; "json" or "console" force one
    format: Literal["auto", "json", "console"] = "auto"
    #: also write JSON lines to this file (relative to the config file), rotated by size; unset = no file
    file: Path | None = None
    #: rotate the file when it reaches this many bytes
    file_max_bytes: int = Field(50_000_000, ge=10_000)
    #: rotated files kept beside it (node.log.1 ... node.log.N)
    file_backup_count: int = Field(10, ge=1)

    @field_validator("level", mode="before")
    @classmethod
    def _upper_level(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HttpConfig(_Model):
    """The HTTP side (dicom_node/web): health, readiness, metrics, JSON API, status page.

    Bound to this machine by default; bound elsewhere it refuses to start
    without a bearer token, because the API shows UIDs and can retry jobs.
    """

    #: serve HTTP beside the DICOM listener (`fusion-node serve` prints its URL)
    enabled: bool = True
    #: 127.0.0.1 = this machine only; any other address needs token or token_file
    host: str = "127.0.0.1"
    #: 0 = any free port (tests)
    port: int = Field(8104, ge=0, le=65535)
    #: bearer token asked of every request but /healthz and /readyz; prefer token_file
    token: str | None = None
    #: a file holding only the token, readable by the node's user
    token_file: Path | None = None
    #: PEM certificate (chain) and unencrypted key: serve HTTPS instead of HTTP
    certificate: Path | None = None
    private_key: Path | None = None
    #: /readyz says not ready when the store's file system has less free space than this (MiB)
    disk_reserve_mb: int = Field(1024, ge=0)
    #: seconds between C-ECHO checks of the destinations (cached; a probe never waits on a PACS)
    check_interval_s: float = Field(60.0, gt=0)
    #: seconds the status page waits before it reloads itself
    refresh_s: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _protected(self) -> HttpConfig:
        if self.enabled and not _is_loopback(self.host) and self.token is None and self.token_file is None:
            raise ValueError(f"http.host {self.host!r} is reachable from other machines, and no token is set; "
                             "set token_file (a file holding a long random token) or bind host = \"127.0.0.1\"")
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("set both certificate and private_key (HTTPS), or neither")
        return self


#: what a notification can be about
NotificationEvent = Literal["job_failed", "dead_letter", "registration_doubtful", "destination_down", "destination_up"]
NOTIFICATION_EVENTS: tuple[str, ...] = ("job_failed", "dead_letter", "registration_doubtful", "destination_down",
                                        "destination_up")


class Notification(_Model):
    """One receiver of notifications: a webhook (HTTP POST of JSON) or e-mail over SMTP.

    Payloads carry UIDs, counts and the node's messages, never patient names or
    IDs.  A receiver that cannot be reached is logged; the node carries on.
    """

    name: str
    kind: Literal["webhook", "email"] = "webhook"
    #: which events this receiver hears
    events: list[NotificationEvent] = list(NOTIFICATION_EVENTS)  # type: ignore[arg-type]  # the same strings, typed
    #: webhook: the URL the JSON is POSTed to
    url: str | None = None
    #: webhook: bearer token sent with each POST; prefer token_file
    token: str | None = None
    token_file: Path | None = None
    #: seconds to wait for the receiver (webhook or SMTP server)
    timeout_s: float = Field(10.0, gt=0)
    #: e-mail: the SMTP server (no authentication; a local relay is the usual set-up)
    smtp_host: str = "localhost"
    smtp_port: int = Field(25, ge=1, le=65535)
    #: e-mail: upgrade the SMTP connection with STARTTLS
    starttls: bool = False
    #: e-mail: From address and recipients
    sender: str = "fusion-node@localhost"
    recipients: list[str] = []

    @model_validator(mode="after")
    def _complete(self) -> Notification:
        if self.kind == "webhook" and not self.url:
            raise ValueError(f"notification {self.name!r} is a webhook without url; set url = \"https://...\"")
        if self.kind == "email" and not self.recipients:
            raise ValueError(f"notification {self.name!r} sends e-mail to nobody; set recipients = [\"ops@example.org\"]")
        return self


class ExecutorConfig(_Model):
    """Where a fusion job's stages run (dicom_node/workflow/runners.py): in the node's process or on Dask workers.

    The node claims, stores and sends as always; only ``run_pipeline`` moves.
    With ``kind = "dask"`` every worker must see ``[storage] root`` at the same
    absolute path (a shared file system): the job's files are read there and
    the QC pictures and fused checkpoints written there.
    """

    #: "local" = in this process (``workers`` threads; the default); "dask" = on the workers of a Dask scheduler
    kind: Literal["local", "dask"] = "local"
    #: the Dask scheduler's address, e.g. "tcp://10.0.0.5:8786" (``dask scheduler`` prints it); kind = "dask" only
    scheduler: str = ""
    #: seconds to reach the scheduler; a job that cannot be submitted in this time goes back to the queue
    connect_timeout_s: float = Field(30.0, gt=0)
    #: Dask worker resources one job holds, e.g. {GPU = 1} for workers started with ``--resources GPU=1``;
    #: empty = any worker (start workers with ``--nthreads 1``: one job per worker at a time)
    resources: dict[str, float] = {}

    @field_validator("scheduler")
    @classmethod
    def _address(cls, v: str) -> str:
        v = v.strip()
        if v and not re.fullmatch(r"(tcp|tls)://[^\s/]+:\d+|[^\s/:]+:\d+", v):
            raise ValueError(f"{v!r} is not a Dask scheduler address; write e.g. \"tcp://10.0.0.5:8786\" "
                             "(the address `dask scheduler` prints at start-up)")
        return v

    @model_validator(mode="after")
    def _complete(self) -> ExecutorConfig:
        if self.kind == "dask" and not self.scheduler:
            raise ValueError("kind = \"dask\" needs scheduler, the Dask scheduler's address, e.g. "
                             "scheduler = \"tcp://10.0.0.5:8786\" (start one with `dask scheduler`), "
                             "or kind = \"local\" to fuse in this process")
        return self


class NodeSettings(_Model):
    node: NodeConfig = NodeConfig()
    storage: StorageConfig = StorageConfig()
    settle: SettleConfig = SettleConfig()
    #: prefix for every UID the node creates; get your organisation's own root
    uid_root: str = "1.2.826.0.1.3680043.8.498."
    destinations: list[Destination] = []
    pipelines: list[Pipeline] = []
    outbox: OutboxConfig = OutboxConfig()
    query_retrieve: QueryRetrieveConfig = QueryRetrieveConfig()
    retention: RetentionConfig = RetentionConfig()
    #: decoding limits applied to every received instance
    limits: LimitsConfig = LimitsConfig()
    logging: LoggingConfig = LoggingConfig()
    http: HttpConfig = HttpConfig()
    #: who hears of failed jobs, dead letters, doubtful registrations and destinations down
    notifications: list[Notification] = []
    #: parallel fusion jobs (each uses the GPU or all cores); with [executor] kind = "dask", jobs in flight
    workers: int = Field(1, ge=1)
    #: where the jobs' stages run: this process (default) or Dask workers
    executor: ExecutorConfig = ExecutorConfig()
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("uid_root")
    @classmethod
    def _uid_root(cls, v: str) -> str:
        if not re.fullmatch(r"(0|[1-9]\d*)(\.(0|[1-9]\d*))*\.", v) or len(v) > 40:
            raise ValueError("uid_root is dotted digits ending in '.', at most 40 characters (e.g. '1.2.826.0.1.3680043.8.498.')")
        return v

    @model_validator(mode="after")
    def _references(self) -> NodeSettings:
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
        dicom_names = {d.name for d in self.dicom_destinations()}
        for d in self.query_retrieve.move_destinations:
            if d not in names:
                raise ValueError(f"query_retrieve.move_destinations names unknown destination {d!r}; "
                                 "define it under [[destinations]]")
            if d not in dicom_names:
                raise ValueError(f"query_retrieve.move_destinations names {d!r}, a DICOMweb destination; "
                                 "C-MOVE sends over DICOM, so name a destination of kind \"dicom\"")
        return self

    @model_validator(mode="after")
    def _called_ae_titles(self) -> NodeSettings:
        seen = {self.node.ae_title.strip(): "node.ae_title"}
        for p in self.pipelines:
            if p.ae_title is None:
                continue
            if p.ae_title in seen:
                raise ValueError(f"pipeline {p.name!r} ae_title {p.ae_title!r} is already used by {seen[p.ae_title]}; "
                                 "each called AE title must route to one place")
            seen[p.ae_title] = f"pipeline {p.name!r}"
        return self

    def destination(self, name: str) -> DicomDestination | DicomWebDestination:
        for d in self.destinations:
            if d.name == name:
                return d
        raise KeyError(name)

    def dicom_destinations(self) -> list[DicomDestination]:
        """The destinations reached over DICOM (the only possible C-MOVE targets)."""
        return [d for d in self.destinations if isinstance(d, DicomDestination)]


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
        cfg = cfg.model_copy(update={"storage": storage.model_copy(update={"root": root, "database": db})})
        cfg = _log_file_path(cfg, base_dir)
    return _tls_files(cfg, base_dir, source)


def _log_file_path(cfg: NodeSettings, base_dir: Path) -> NodeSettings:
    """The log file relative to the config file's folder, like every other path in it."""
    file = cfg.logging.file
    if file is None or file.is_absolute():
        return cfg
    return cfg.model_copy(update={"logging": cfg.logging.model_copy(update={"file": base_dir / file})})


_TLS_FILE_KEYS = ("certificate", "private_key", "ca_certificates")
M = TypeVar("M", bound=_Model)


def _tls_paths(model: M, key_prefix: str, base_dir: Path | None, source: str, *, check: bool = True,
               owner: str = "", keys: tuple[str, ...] = _TLS_FILE_KEYS) -> M:
    """The TLS section with its paths made absolute (relative to the config file) and checked now.

    A missing key file found at start-up is a clear message; found at the
    first association, it is a refused connection at 3 a.m.
    """
    update = {}
    for key in keys:
        path = getattr(model, key)
        if path is None:
            continue
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        update[key] = path
        if not check:
            continue
        if not path.is_file():
            raise ConfigError(f"{source}: {key_prefix}.{key}{owner}: file not found: {path} "
                              "(a PEM file; paths are relative to the config file's folder)")
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"{source}: {key_prefix}.{key}{owner}: cannot read {path}: {exc.strerror}; "
                              "check the file's permissions for the node's user") from None
    return model.model_copy(update=update)


def _tls_files(cfg: NodeSettings, base_dir: Path | None, source: str) -> NodeSettings:
    node = cfg.node
    # paths of a disabled listener are made absolute too, but only checked when it is enabled
    node = node.model_copy(update={"tls": _tls_paths(node.tls, "node.tls", base_dir, source, check=node.tls.enabled)})
    destinations: list[DicomDestination | DicomWebDestination] = []
    for i, d in enumerate(cfg.destinations):
        owner = f" (destination {d.name!r})"
        if isinstance(d, DicomWebDestination):
            d = _tls_paths(d, f"destinations.{i}", base_dir, source, owner=owner,
                           keys=("ca_certificates", "token_file", "password_file"))
        elif d.tls is not None:
            d = d.model_copy(update={"tls": _tls_paths(d.tls, f"destinations.{i}.tls", base_dir, source, owner=owner)})
        destinations.append(d)
    http = _tls_paths(cfg.http, "http", base_dir, source, check=cfg.http.enabled,
                      keys=("certificate", "private_key", "token_file"))
    notifications = [_tls_paths(n, f"notifications.{i}", base_dir, source, keys=("token_file",))
                     for i, n in enumerate(cfg.notifications)]
    return cfg.model_copy(update={"node": node, "destinations": destinations, "http": http,
                                  "notifications": notifications})


EXAMPLE_TOML = """\
# dicom-fusion-node configuration. Every key is optional unless marked required;
# the value shown is the default (tests/test_config.py checks), except for keys that
# have none (TLS files, destinations, pipelines), which show an example.

# Prefix of every UID the node creates (fused series, instances, REG objects).
# Replace with your organisation's registered root.
uid_root = "1.2.826.0.1.3680043.8.498."
# Fusion jobs run at once; each one uses the GPU if there is one, else all cores.
workers = 1
# auto = GPU when CuPy sees one, else CPU (with [executor] kind = "dask": each worker's own
# FUSION_DEVICE, else its GPU if it has one)
device = "auto"

# Where fusion jobs run. "local" (the default): in this process, `workers` jobs at once.
# "dask": on the workers of a Dask scheduler (pip install '.[dask]'); the node still
# receives, stores and sends, and `workers` is then the number of jobs in flight.
# Every Dask worker must see [storage] root at the same absolute path (shared storage);
# start each with `fusion-node worker --config node.toml` (docs/scale-out.md).
[executor]
kind = "local"
scheduler = ""                 # e.g. "tcp://10.0.0.5:8786"; required with kind = "dask"
# Seconds to reach the scheduler; a job not submitted in time goes back to the queue.
connect_timeout_s = 30
# Worker resources one job holds, e.g. {GPU = 1} for workers started with --resources GPU=1.
resources = {}

[node]
ae_title = "FUSIONNODE"
host = "0.0.0.0"
# Plain (unencrypted) DICOM port; plain_enabled = false leaves only the TLS port.
port = 11112
plain_enabled = true
# Who may associate (checked on every association, plain and TLS). A caller that
# fails a check gets an A-ASSOCIATE-RJ (docs/conformance-statement.md, Security).
# Calling AE titles allowed; empty list = anyone. Case-sensitive, e.g. ["CT01", "PACS"].
allowed_callers = []
# Peer IP addresses or networks allowed, IPv4 or IPv6, e.g. ["10.20.0.0/16", "192.168.1.7"];
# empty list = anyone.
allowed_addresses = []
# Reject associations whose Called AE Title is neither ae_title nor a pipeline's ae_title.
require_called_ae = true
# Associations open at once, plain and TLS together; more are rejected (transient,
# local limit exceeded) and the caller retries later.
max_associations = 10
network_timeout_s = 60
# Seconds a new connection has to finish its TLS handshake and send its A-ASSOCIATE-RQ;
# silent connections are closed after this and never take one of max_associations.
artim_timeout_s = 10
# SIGTERM: stop accepting, let open associations and the running job's stage finish for
# at most this long, then exit 0 (an interrupted job is queued again for the restart).
shutdown_timeout_s = 10

# DICOM TLS (BCP 195 profile, TLS 1.2 or newer) on a second port beside the plain one.
# Paths are relative to this file's folder; files are checked when the node starts.
[node.tls]
enabled = false
port = 2762
certificate = "tls/node-cert.pem"      # the node's certificate (chain), PEM
private_key = "tls/node-key.pem"       # its private key, PEM, unencrypted: chmod 600
# CA certificate(s) that sign the callers' client certificates, PEM
ca_certificates = "tls/clients-ca.pem"
# Refuse callers that present no certificate signed by ca_certificates.
require_client_certificate = true

[storage]
# Received and derived instances, relative to this file's folder.
root = "fusion-node-data"
# database = "fusion-node-data/node.sqlite"
# PostgreSQL instead of the SQLite file, when several node processes share one queue (docs/scale-out.md):
database_url = ""
# This node's own name when several node processes share one storage root (docs/scale-out.md):
instance = ""

[settle]
# A series is complete after this many seconds without a new instance ...
quiet_seconds = 30
sweep_interval_s = 2
# ... or as soon as all images it announces (ImagesInAcquisition) have arrived.
use_announced_count = true

[outbox]
# Retries are bounded by time: keep trying an item for retry_for_s (24 h) after its
# first failure, waiting backoff_initial_s doubling up to backoff_max_s between tries;
# then it is dead (`fusion-node outbox list`, `fusion-node outbox retry --series UID`).
retry_for_s = 86400
max_attempts = 0          # 0 = no count limit; time alone decides
backoff_initial_s = 5
backoff_max_s = 300
# A destination failing this long logs outbox.destination.down once (.up when back).
alert_after_s = 600

# What the node deletes, and when (docs/operations.md, Retention). Only series that are
# fused and delivered, or never fused and past their own limit; never one a queued or
# running job or an undelivered outbox item needs. `fusion-node purge --dry-run` shows it.
[retention]
enabled = true
interval_s = 600
received_max_age_days = 7
derived_max_age_days = 7
unfused_max_age_days = 14
# Free disk below min_free_percent: purge eligible series oldest first, whatever their age.
min_free_percent = 10.0
# Free disk below reserve_free_percent: refuse C-STORE with 0xA700 (out of resources).
reserve_free_percent = 3.0

# Query/Retrieve for workstations: C-FIND, C-GET, and C-MOVE to known destinations.
[query_retrieve]
enabled = true
# Names of [[destinations]] a C-MOVE may send to; empty = every destination.
move_destinations = []
# Who may query and retrieve, on top of [node] allowed_callers / allowed_addresses (storage).
# Q/R shows every patient the node holds, so nobody may until a list is set: name the
# workstations' AE titles and/or addresses, e.g. ["WS01"] and ["10.20.30.0/24"]; a caller
# must match every list that is set. Others still store and echo, but their Q/R
# presentation contexts are rejected.
allowed_callers = []
allowed_addresses = []

# Decoding limits at intake: every received instance is decoded (all frames) before
# it is acknowledged; larger ones are refused with 0xA700 and the reason in the log.
[limits]
# Largest frame in pixels (Rows x Columns), 4096 x 4096; compressed frame headers are checked too.
max_frame_pixels = 16777216
# Largest decoded frame in bytes (64 MiB).
max_frame_bytes = 67108864
# Largest received instance in bytes (1 GiB).
max_instance_bytes = 1073741824
# Largest dataset after inflating Deflated Explicit VR Little Endian (1 GiB, inflated to disk).
max_inflated_bytes = 1073741824
# Pixel decodes at once over all associations; peak memory grows by about
# decode_concurrency x 4 x max_frame_bytes (docs/reliability.md).
decode_concurrency = 2
# Seconds a C-STORE waits for a decode slot before it is refused with 0xA700.
decode_wait_s = 30

# The node's log: JSON lines (one object per line, a stable "event" name) for journald,
# docker and log shippers; a human console format on a terminal. `--log-level` overrides level.
[logging]
level = "INFO"
# auto = console format on a terminal, JSON otherwise; or "json" / "console"
format = "auto"
# Also write JSON lines to a file (relative to this file's folder), rotated by size:
# file = "logs/node.log"
file_max_bytes = 50000000
file_backup_count = 10

# The HTTP side: /healthz, /readyz, /metrics (Prometheus), the JSON API under /api,
# and the status page at /. Bound to this machine by default; any other host needs a
# token (the node refuses to start without one), asked as "Authorization: Bearer ..."
# of every request but /healthz and /readyz (a browser may pass ?token=... once).
[http]
enabled = true
host = "127.0.0.1"
port = 8104
# token_file = "secrets/http-token"     # a file holding only the token, readable by the node's user
# token = "..."                          # or the token itself (prefer token_file)
# certificate = "tls/http-cert.pem"     # serve HTTPS: PEM certificate (chain) and its key
# private_key = "tls/http-key.pem"
# /readyz fails below this much free space (MiB) under [storage] root.
disk_reserve_mb = 1024
# Destinations are checked with C-ECHO this often (seconds); /readyz shows the last answer.
check_interval_s = 60
# The status page reloads itself this often (seconds).
refresh_s = 10

# Who hears of trouble: one block per receiver. Events: job_failed, dead_letter,
# registration_doubtful, destination_down, destination_up. Payloads carry UIDs and
# counts, never patient names or IDs; a receiver that fails is logged, the node goes on.
# [[notifications]]
# name = "ops-webhook"
# kind = "webhook"                       # POST of a JSON object to url
# url = "https://chat.example.org/hooks/fusion"
# token_file = "secrets/webhook-token"   # optional: sent as "Authorization: Bearer ..."
# events = ["job_failed", "dead_letter", "registration_doubtful", "destination_down", "destination_up"]
# timeout_s = 10
# [[notifications]]
# name = "ops-mail"
# kind = "email"                         # plain-text mail through an SMTP relay (no login)
# smtp_host = "localhost"
# smtp_port = 25
# starttls = false
# sender = "fusion-node@localhost"
# recipients = ["radiology-it@example.org"]
# events = ["job_failed", "dead_letter"]

# Where fused series go. Add one block per PACS or workstation.
# kind = "dicom" (C-STORE, the default) or "dicomweb" (STOW-RS, see below).
[[destinations]]
name = "pacs"
kind = "dicom"
ae_title = "PACS"
host = "127.0.0.1"
port = 4242
# Send over DICOM TLS: uncomment the block (paths relative to this file's folder).
# The peer's certificate is always verified.
# [destinations.tls]
# ca_certificates = "tls/pacs-ca.pem"  # CA(s) that signed the PACS certificate; omit = system trust store
# certificate = "tls/node-cert.pem"    # client certificate, when the PACS asks for one (with private_key)
# private_key = "tls/node-key.pem"
# verify_hostname = true               # the certificate must name `host` (DNS name or IP address)

# A DICOMweb destination (STOW-RS): the service's base URL, without /studies.
# Credentials: token or token_file (Bearer), or username with password or password_file (Basic).
# [[destinations]]
# name = "web-pacs"
# kind = "dicomweb"
# url = "https://pacs.example.org/dicom-web"
# token_file = "secrets/pacs-token"     # a file holding only the token, readable by the node's user
# username = "fusion"
# password_file = "secrets/pacs-password"
# ca_certificates = "tls/pacs-ca.pem"   # CA(s) of an https server; omit = the system trust store
# timeout_s = 60
# batch_size = 50                       # instances per STOW-RS request

# A pipeline pairs a base series with an overlay series and fuses them.
[[pipelines]]
name = "mr-ct"
# study | patient | rule (rule = the selectors alone decide; use for phantoms
# or outside studies registered under another patient ID)
match = "study"
partner_timeout_s = 3600
destinations = ["pacs"]
# The fusion method: "faithful" (default: gradient-domain, keeps bone and uptake;
# docs/fidelity.md), "dmf", "dmf_paper" (the paper's DMF and trios), or any single method
# of fusion.methods (adf, cbf, fpde, gfce, mdlatlrr, mgff, tif, wls; `fusion-node fuse --help`).
method = "faithful"
# DMF exposures (DMF methods only); [] = default per modality (CT: cbf,tif,wls; PET/SPECT: adf,cbf,tif; docs/quality.md)
trio = []
feature_source = "vgg"
# CT window [centre, width] in HU; empty = from the CT header, else brain (40, 80)
ct_window = []
# PET/NM colour: a DICOM standard palette, "hot_iron" or "pet" (PS3.6 Annex B)
palette = "hot_iron"
# Warn (job result, log) when the CT window shows more than this share of the body white or black
ct_saturation_warning = 0.5
# Optional own Called AE Title for this pipeline (unique, not the node's): series sent
# to it are paired by this pipeline only with series that also arrived through it.
# A pipeline without one takes series sent to the node's AE title, not those sent to another pipeline's.
# ae_title = "FUSE_MRCT"
# Who may call that AE title, on top of [node] allowed_callers / allowed_addresses
# (only with ae_title set; empty = no further restriction).
allowed_callers = []
allowed_addresses = []

[pipelines.base]
modality = ["CT"]
description = ""       # regular expression on SeriesDescription, case-insensitive
min_instances = 1      # fewer instances than this: not this pipeline's series (e.g. a scout)

[pipelines.overlay]
modality = ["MR"]
description = ""
min_instances = 1

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
flip_margin = 0.04          # relative lead of the mirrored fit that counts as flipped
"""
