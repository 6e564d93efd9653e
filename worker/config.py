"""The one typed configuration of the product.

Read from a TOML file (``--config FILE`` or ``RETINALGPT_CONFIG``) with ``RETINALGPT_<SECTION>__<KEY>``
environment overrides (environment wins). Every key is documented in ``docs/configuration.md``.
Relative paths are resolved against ``home``; ``database.url`` and ``broker.url`` default to files below
``home`` (the embedded default: SQLite database, kombu SQLAlchemy transport, filesystem storage).

Other packages never import this module: :mod:`worker` builds their plain parameter objects from it.
"""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

CONFIG_ENV = "RETINALGPT_CONFIG"

AETitle = Annotated[str, Field(min_length=1, max_length=16, pattern=r"^[ -~]*[!-~][ -~]*$")]
"""An Application Entity title: 1–16 printable ASCII characters, not all spaces (PS3.5 §6.2, AE VR)."""


class ConfigError(ValueError):
    """A configuration value is wrong; the message is one line naming the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AllowedCaller(_Section):
    """A calling AE title allowed to associate, optionally bound to the host it must come from."""

    ae_title: AETitle
    host: str | None = None


class TlsSettings(_Section):
    """TLS for the DICOM listener (server) or a DICOM / HL7 v2 destination or archive (client) (PS3.15 Annex B.1,
    TLS secure transport). A server needs its certificate and key; a client presents one only when the peer asks
    for mutual TLS, and otherwise only verifies the peer against ``ca_certificates`` (default: the system CAs)."""

    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = Field(default=None, description="CA bundle to verify the peer")
    require_client_certificate: bool = False

    @model_validator(mode="after")
    def _complete(self) -> TlsSettings:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("tls.certificate and tls.private_key go together")
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("tls.require_client_certificate needs tls.ca_certificates")
        return self


class DuplicatePolicy(StrEnum):
    KEEP_FIRST = "keep_first"
    REPLACE = "replace"


class UnsupportedSopPolicy(StrEnum):
    STORE = "store"
    REJECT = "reject"


class DicomSettings(_Section):
    ae_title: AETitle = "RETINALGPT"
    bind_address: str = "0.0.0.0"
    port: int = Field(default=11112, ge=1, le=65535)
    allowed_callers: list[AllowedCaller] = Field(default_factory=list)
    stable_seconds: float = Field(default=10.0, gt=0)
    max_wait_seconds: float = Field(default=600.0, gt=0)
    duplicate_policy: DuplicatePolicy = DuplicatePolicy.KEEP_FIRST
    unsupported_sop_classes: UnsupportedSopPolicy = UnsupportedSopPolicy.STORE
    analyse_derived_images: bool = Field(default=False, description="analyse images marked DERIVED or with "
                                         "burned-in annotation (key images, montages); our own objects never are")
    max_pdu_size: int = Field(default=4 * 1024 * 1024, ge=0, description="0 means unlimited")
    network_timeout: float = Field(default=60.0, gt=0)
    acse_timeout: float = Field(default=30.0, gt=0)
    dimse_timeout: float = Field(default=60.0, gt=0)
    max_associations: int = Field(default=16, ge=1)
    max_connections_per_host: int = Field(default=8, ge=1, description="open connections from one host not "
                                          "named in allowed_callers")
    max_negotiating_connections: int = Field(default=32, ge=1, description="connections from hosts not named in "
                                             "allowed_callers that have not sent their whole A-ASSOCIATE-RQ yet")
    max_instance_mb: float = Field(default=512.0, gt=0, le=4096, description="largest data set received or "
                                   "inflated (MiB); larger ones are refused with 0xA700")
    tls: TlsSettings = Field(default_factory=TlsSettings)

    @model_validator(mode="after")
    def _waits(self) -> DicomSettings:
        if self.max_wait_seconds < self.stable_seconds:
            raise ValueError("dicom.max_wait_seconds must be >= dicom.stable_seconds")
        if self.tls.enabled and self.tls.certificate is None:
            raise ValueError("dicom.tls.enabled needs dicom.tls.certificate and dicom.tls.private_key (the "
                             "listener's own certificate)")
        return self


class StorageSettings(_Section):
    """Where received instances live, how long their originals are kept, and the free space the node keeps."""

    path: Path = Path("studies")
    fsync: bool = True
    retain_days: float | None = Field(default=None, gt=0, description="originals of a delivered study whose last "
                                      "instance arrived longer ago than this are deleted (results and database rows "
                                      "kept, the study marked purged); unset: kept for ever")
    min_free_gb: float = Field(default=1.0, ge=0, description="below this much free space (GB, 10^9 bytes) on the "
                               "storage folder's file system the node answers C-STORE with 0xA700 before writing "
                               "anything; 0 turns the check off")
    retention_sweep_seconds: float = Field(default=600.0, gt=0, description="how often the bookkeeper looks for "
                                           "originals past retain_days")

    @property
    def min_free_bytes(self) -> int:
        return int(self.min_free_gb * 1e9)


class DatabaseSettings(_Section):
    url: str = ""
    echo: bool = False


class BrokerSettings(_Section):
    url: str = ""
    result_backend: str = ""
    visibility_timeout: int = Field(default=3600, gt=0, description="seconds before an unacked task is redelivered")
    polling_seconds: float = Field(default=0.1, gt=0, le=10, description="SQLAlchemy broker: how often an idle "
                                   "worker looks for messages")


class PipelineSettings(_Section):
    """Job supervision: heartbeats of running jobs and when the bookkeeper re-queues lost work."""

    heartbeat_seconds: float = Field(default=5.0, gt=0)
    stale_after_seconds: float = Field(default=30.0, gt=0, description="a running job without heartbeat is lost")
    requeue_after_seconds: float = Field(default=60.0, gt=0, description="a queued job or open delivery untouched")
    failed_retry_seconds: float = Field(default=30.0, ge=0)
    max_attempts: int = Field(default=3, ge=1, description="analysis attempts before a job is dead")
    sweep_seconds: float = Field(default=2.0, gt=0)
    shadow_resend_per_sweep: int = Field(default=10, ge=0, description="shadow analyses whose message was lost "
                                         "the bookkeeper sends again per sweep (0: never)")
    analysis_time_limit_seconds: float = Field(default=3600.0, gt=0, description="hard time limit of one analysis "
                                               "attempt: its pool process is killed and the attempt failed")
    delivery_time_limit_seconds: float = Field(default=900.0, gt=0, description="hard time limit of one delivery "
                                               "task where it runs in a process pool")

    @model_validator(mode="after")
    def _heartbeat_shorter(self) -> PipelineSettings:
        if self.stale_after_seconds <= 2 * self.heartbeat_seconds:
            raise ValueError("pipeline.stale_after_seconds must exceed twice pipeline.heartbeat_seconds")
        return self


class ModelSettings(_Section):
    """Which RetinalGPT model the inference workers run."""

    enabled: bool = True
    path: Path | None = Field(default=None, description="model directory; default: the registry's active version")
    registry: Path = Path("models")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantization: Literal["none", "4bit", "8bit"] = "none"
    batch_size: int = Field(default=8, ge=1)
    max_new_tokens: int = Field(default=256, ge=1)
    constrained_decoding: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="decode the protocol questions under their canonical grammar; auto: when the model's metadata "
        "says it was trained on canonical answers",
    )
    promotion_margin: float = Field(
        default=0.02, ge=0.0, le=0.5,
        description="`retinalgpt model activate` refuses a candidate whose AUC or sensitivity on the site's signed "
        "cases is below the active version's by more than this (per condition), unless --force",
    )
    promotion_min_cases: int = Field(
        default=20, ge=1, description="signed images of a condition (both classes present) needed before the "
        "promotion gate judges that condition",
    )
    operating_threshold: float = Field(
        default=0.5, gt=0.0, lt=1.0, description="P(present) at or above which a finding counts as present in "
        "`retinalgpt model compare` and the promotion gate (sensitivity, specificity, agreement)",
    )


class AnalysisSettings(_Section):
    """The deterministic measurement pipeline."""

    vessel_method: Literal["network", "classical"] = "network"
    definitions: Literal["standard", "automorph"] = "standard"
    field_angle_degrees: float = Field(default=45.0, gt=0, le=200)
    working_size: int = Field(default=768, ge=256, le=2048)
    max_image_pixels: int = Field(default=50_000_000, ge=1_000_000, le=1_000_000_000, description="images with "
                                  "more pixels (Rows × Columns) are not decoded: a per-image 'too large' note")
    decode_size: int = Field(default=4096, ge=256, le=16384, description="decoded frames are reduced at decode to "
                             "at most this many pixels on their longer side")

    @model_validator(mode="after")
    def _decode_covers_working(self) -> AnalysisSettings:
        if self.decode_size < self.working_size:
            raise ValueError("analysis.decode_size must be >= analysis.working_size")
        return self


class ReportingSettings(_Section):
    """Result objects built for each analysis (reporting.ReportOptions)."""

    manufacturer: str = "RetinalGPT Worker"
    institution_name: str | None = None
    segmentation: bool = False
    key_image: bool = True
    pdf: bool = True
    sr_series_number: int = Field(default=9001, ge=1)
    seg_series_number: int = Field(default=9002, ge=1)
    key_image_series_number: int = Field(default=9003, ge=1)
    pdf_series_number: int = Field(default=9004, ge=1)
    fhir_patient_system: str = Field(default="urn:retinalgpt:patient-id", min_length=1,
                                     description="FHIR Patient.identifier.system of the DICOM Patient ID")


class FhirAuth(_Section):
    kind: Literal["none", "bearer", "basic", "mtls"] = "none"
    token: SecretStr | None = None
    username: str | None = None
    password: SecretStr | None = None
    client_certificate: Path | None = None
    client_key: Path | None = None
    ca_certificates: Path | None = None


HL7_ID = Annotated[str, Field(max_length=180, pattern=r"^[^|^~\\&\r\n]*$")]
"""An HD namespace value (MSH-3..6): no HL7 delimiter, no line break."""


class Hl7Settings(_Section):
    """The ORU^R01 message of an ``hl7v2`` destination (reporting.hl7.OruOptions; HL7 v2.5.1 Ch. 2 and 7)."""

    sending_application: HL7_ID = "RETINALGPT"
    sending_facility: HL7_ID = ""
    receiving_application: HL7_ID = ""
    receiving_facility: HL7_ID = ""
    processing_id: Literal["P", "T", "D"] = Field(default="P", description="MSH-11: production, training, debug")
    result_status: Literal["P", "F"] = Field(default="P", description="OBR-25 / OBX-11 of unsigned AI results; "
                                             "a clinician-signed result is F (C when it corrects a signed one)")
    patient_class: str = Field(default="U", pattern=r"^[A-Z]$", description="PV1-2 (HL7 table 0004)")
    assigning_authority: HL7_ID = Field(default="", description="PID-3.4 when the study has no Issuer of "
                                        "Patient ID")
    include_pdf: bool = Field(default=False, description="send the PDF report as an ED OBX")


FORWARD_KINDS = ("dicom", "dicomweb")
"""Destination kinds that take DICOM instances: the result objects (one delivery row per object kind) and the
originals that routing rules forward (C-STORE or STOW-RS)."""


class Destination(_Section):
    """Where results go: a DICOM peer (C-STORE), a DICOMweb origin server (STOW-RS), a FHIR server
    (transaction), an HL7 v2 receiver (ORU^R01 over MLLP), or a folder."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["dicom", "dicomweb", "fhir", "folder", "hl7v2"]
    ae_title: AETitle | None = None
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    url: str | None = None
    auth: FhirAuth = Field(default_factory=FhirAuth)
    path: Path | None = None
    hl7: Hl7Settings = Field(default_factory=Hl7Settings)
    timeout: float = Field(default=30.0, gt=0)
    connect_timeout: float = Field(default=10.0, gt=0, description="hl7v2, dicomweb: seconds to open the "
                                   "connection")
    max_attempts: int = Field(default=8, ge=1)
    backoff_seconds: float = Field(default=5.0, ge=0)
    originals_first: bool = Field(default=True, description="a study's results go to this destination only once "
                                  "the originals forwarded to it (routing rules) are delivered")

    @model_validator(mode="after")
    def _fields_for_kind(self) -> Destination:
        needed = {"dicom": ("ae_title", "host", "port"), "dicomweb": ("url",), "fhir": ("url",),
                  "folder": ("path",), "hl7v2": ("host", "port")}[self.kind]
        missing = [f for f in needed if getattr(self, f) is None]
        if missing:
            raise ValueError(f"destination {self.name!r} of kind {self.kind} needs {', '.join(missing)}")
        return self


class Archive(_Section):
    """A query/retrieve peer (a PACS) that studies are fetched back from: C-FIND and C-MOVE in the Study Root
    model (PS3.4 Annex C), the instances sent by the peer to our own listener (``move_destination``)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    ae_title: AETitle
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    retrieve: Literal["get", "move"] = Field(default="get", description="get: C-GET, the instances come back on "
                                             "our own association (no listener needed); move: C-MOVE to "
                                             "move_destination, received by the running node's listener")
    move_destination: AETitle | None = Field(default=None, description="the AE title the peer sends the "
                                             "instances to (C-MOVE Move Destination); default: dicom.ae_title")
    timeout: float = Field(default=30.0, gt=0, description="seconds per network operation (association, each "
                           "C-FIND/C-MOVE response)")
    record_timeout: float = Field(default=60.0, gt=0, description="seconds to wait, after the peer reported the "
                                  "move complete, for the node to have recorded every instance")


class ValueMatch(_Section):
    """One test on a value (routing rules): exactly one of ``equals``, ``glob`` (fnmatch, case-sensitive),
    ``regex`` (Python ``re.fullmatch``) or ``present`` (true: the value is there and not empty)."""

    equals: str | None = None
    glob: str | None = None
    regex: str | None = None
    present: bool | None = None

    @model_validator(mode="after")
    def _one_operator(self) -> ValueMatch:
        given = [name for name in ("equals", "glob", "regex", "present") if getattr(self, name) is not None]
        if len(given) != 1:
            got = ", ".join(given) or "none"
            raise ValueError(f"a test takes exactly one of equals, glob, regex, present (got {got})")
        if self.regex is not None:
            import re

            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"regex {self.regex!r} does not compile: {exc}") from None
        return self


def _glob_from_string(value: Any) -> Any:
    return {"glob": value} if isinstance(value, str) else value


MatchValue = Annotated[ValueMatch, BeforeValidator(_glob_from_string)]
"""A test; a plain string is a glob (an exact match when it holds no ``*``, ``?`` or ``[``)."""


class Priority(StrEnum):
    NORMAL = "normal"
    URGENT = "urgent"


class Rule(_Section):
    """A routing rule (issue 15): what it matches and what it decides. Rules are tried in order for every
    received instance; the first whose every given test passes decides; with none matching, the built-in
    default (analyse, forward nowhere, normal priority: the behaviour without rules)."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    calling_ae: MatchValue | None = None
    called_ae: MatchValue | None = None
    peer_host: MatchValue | None = None
    modality: MatchValue | None = None
    sop_class_uid: MatchValue | None = None
    attributes: dict[str, MatchValue] = Field(default_factory=dict, description="DICOM keyword → test")
    analyse: bool = True
    forward: list[str] = Field(default_factory=list, description="names of dicom or dicomweb destinations for the "
                               "originals")
    priority: Priority = Priority.NORMAL

    @field_validator("attributes")
    @classmethod
    def _keywords(cls, attributes: dict[str, MatchValue]) -> dict[str, MatchValue]:
        from pydicom.datadict import tag_for_keyword

        unknown = [k for k in attributes if tag_for_keyword(k) is None]
        if unknown:
            raise ValueError(f"not DICOM keywords: {', '.join(unknown)}")
        return attributes


class ApiToken(_Section):
    """A bearer token, stored as its SHA-256 hex digest (never in clear)."""

    name: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    role: Literal["read", "clinician", "admin", "sender"] = Field(
        default="read", description="read: GET routes; clinician: also sign-off; admin: everything but sign-off; "
        "sender: STOW-RS ingest only")
    observer_name: str | None = Field(default=None, max_length=64, description="clinician tokens: the DICOM "
                                      "person name (Family^Given) written as the SR's Verifying Observer")
    organisation: str | None = Field(default=None, max_length=64, description="clinician tokens: the "
                                     "Verifying Organization (default: reporting.institution_name)")

    @model_validator(mode="after")
    def _observer(self) -> ApiToken:
        """A clinician signs as a person (PS3.5 6.2 PN, at least Family^Given): the SR's Verifying Observer Name."""
        if self.role == "clinician" and (self.observer_name is None or "^" not in self.observer_name
                                         or not self.observer_name.split("^")[0].strip()):
            raise ValueError(f"api token {self.name!r}: a clinician token needs observer_name as a DICOM person "
                             "name, Family^Given (the verifying observer of the SRs it signs)")
        if self.role != "clinician" and (self.observer_name or self.organisation):
            raise ValueError(f"api token {self.name!r}: observer_name and organisation are for clinician tokens")
        return self


class ApiSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    tokens: list[ApiToken] = Field(default_factory=list)
    cors_origins: list[str] = Field(default_factory=list)
    max_request_bytes: int = Field(default=1_048_576, ge=1024)
    base_url: str | None = Field(default=None, description="public base URL used in FHIR links")
    chat_timeout_seconds: float = Field(default=120.0, gt=0, description="how long a chat request waits for the answer")
    metrics_public: bool = Field(default=True, description="serve /metrics without a token")
    stow_max_request_mb: float = Field(default=4096.0, gt=0, description="largest STOW-RS request body (MiB), "
                                       "spooled to disk, never held in memory; larger ones get 413 and nothing "
                                       "of them is stored")


class LoggingSettings(_Section):
    """What log lines may say (worker/logsetup.py)."""

    phi: bool = Field(default=False, description="log lines may name the patient (name, ID, birth date); "
                      "off by default: lines identify studies by UID only")


class AuditSettings(_Section):
    """What the audit trail keeps."""

    chat_text: Literal["full", "hash"] = Field(
        default="hash", description="chat questions and answers in the audit trail: their full text, or only "
        "their SHA-256 and length (a question may name the patient)")


class MonitoringSettings(_Section):
    """Model monitoring (worker/monitoring.py): per model version distributions over a bounded window of the most
    recent stored analyses, and the drift check against the model's evaluation distribution."""

    enabled: bool = Field(default=True, description="expose the per model version metrics and the drift check")
    window_analyses: int = Field(default=500, ge=10, le=100_000, description="most recent analyses per model "
                                 "version in the window")
    window_days: float = Field(default=30.0, gt=0, le=3650, description="only analyses stored this recently")
    drift_threshold: float = Field(default=0.25, gt=0, le=10, description="population stability index above "
                                   "which a condition's recent distribution counts as drifted")
    drift_min_samples: int = Field(default=50, ge=10, description="fewest image probabilities of a condition in "
                                   "the window before its drift is judged")
    drift_fails_readiness: bool = Field(default=False, description="a drifted condition makes /readyz answer 503 "
                                        "(default: reported in its detail only)")
    drift_references: list[Path] = Field(default_factory=list, description="evaluation metrics.json files (from "
                                         "`retinalgpt evaluate`) besides those found in the model directories")
    agreement_window_signoffs: int = Field(default=200, ge=1, le=100_000, description="most recent clinician "
                                           "sign-offs per model version in the agreement window")
    agreement_window_days: float = Field(default=90.0, gt=0, le=3650, description="only sign-offs made this "
                                         "recently count towards the agreement rates")

    @model_validator(mode="after")
    def _samples_fit_window(self) -> MonitoringSettings:
        if self.drift_min_samples > self.window_analyses:
            raise ValueError("monitoring.drift_min_samples must not exceed monitoring.window_analyses (a study of "
                             "one image must be able to reach it)")
        return self


class Settings(BaseSettings):
    """The whole configuration."""

    model_config = SettingsConfigDict(
        env_prefix="RETINALGPT_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    home: Path = Path("var")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    dicom: DicomSettings = Field(default_factory=DicomSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    analysis: AnalysisSettings = Field(default_factory=AnalysisSettings)
    reporting: ReportingSettings = Field(default_factory=ReportingSettings)
    destinations: list[Destination] = Field(default_factory=list)
    rules: list[Rule] = Field(default_factory=list)
    archives: list[Archive] = Field(default_factory=list)
    api: ApiSettings = Field(default_factory=ApiSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    monitoring: MonitoringSettings = Field(default_factory=MonitoringSettings)

    _toml_file: Path | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml = _current_toml.get("path")
        if toml is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml))
        return tuple(sources)

    @field_validator("destinations")
    @classmethod
    def _unique_names(cls, destinations: list[Destination]) -> list[Destination]:
        names = [d.name for d in destinations]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"destination names must be unique: {', '.join(dupes)}")
        return destinations

    @model_validator(mode="after")
    def _rules_name_destinations(self) -> Settings:
        names = [rule.name for rule in self.rules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"rule names must be unique: {', '.join(dupes)}")
        kinds = {d.name: d.kind for d in self.destinations}
        for rule in self.rules:
            for name in rule.forward:
                if name not in kinds:
                    raise ValueError(f"rule {rule.name!r} forwards to {name!r}, which is not a configured destination")
                if kinds[name] not in FORWARD_KINDS:
                    raise ValueError(f"rule {rule.name!r} forwards originals to {name!r}, a {kinds[name]} "
                                     "destination: originals go only to destinations of kind "
                                     f"{' or '.join(FORWARD_KINDS)} (DIMSE C-STORE or DICOMweb STOW-RS)")
        return self

    @model_validator(mode="after")
    def _archives_can_send_to_us(self) -> Settings:
        names = [a.name for a in self.archives]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"archive names must be unique: {', '.join(dupes)}")
        callers = {caller.ae_title for caller in self.dicom.allowed_callers}
        for archive in self.archives:
            if archive.retrieve == "move" and archive.ae_title not in callers:
                raise ValueError(f"archive {archive.name!r}: its AE title {archive.ae_title!r} must be in "
                                 "dicom.allowed_callers (with retrieve = \"move\" it sends the instances to our listener)")
        return self

    @model_validator(mode="after")
    def _resolve_paths(self) -> Settings:
        self.home = self.home.expanduser().absolute()
        self.storage.path = self._below_home(self.storage.path)
        self.model.registry = self._below_home(self.model.registry)
        if self.model.path is not None:
            self.model.path = self._below_home(self.model.path)
        if not self.database.url:
            self.database.url = f"sqlite:///{self.home / 'retinalgpt.sqlite'}"
        if not self.broker.url:
            self.broker.url = f"sqla+sqlite:///{self.home / 'broker.sqlite'}"
        if not self.broker.result_backend:
            self.broker.result_backend = f"db+sqlite:///{self.home / 'results.sqlite'}"
        for dest in self.destinations:
            if dest.path is not None:
                dest.path = self._below_home(dest.path)
        return self

    def _below_home(self, path: Path) -> Path:
        path = path.expanduser()
        return path if path.is_absolute() else self.home / path

    def destination(self, name: str) -> Destination:
        """The destination called ``name``; :class:`ConfigError` if none is configured."""
        for dest in self.destinations:
            if dest.name == name:
                return dest
        known = ", ".join(d.name for d in self.destinations) or "none configured"
        raise ConfigError(f"unknown destination {name!r} (known: {known})")

    def archive(self, name: str | None) -> Archive:
        """The archive called ``name`` (the only one when ``name`` is None); :class:`ConfigError` otherwise."""
        known = ", ".join(a.name for a in self.archives) or "none configured"
        if name is None:
            if len(self.archives) == 1:
                return self.archives[0]
            raise ConfigError(f"name the archive to retrieve from with --from (configured: {known})")
        for archive in self.archives:
            if archive.name == name:
                return archive
        raise ConfigError(f"unknown archive {name!r} (configured [[archives]]: {known})")

    def masked(self) -> dict[str, Any]:
        """The effective configuration as plain data with secrets masked: ``SecretStr`` values and the
        password of every URL (database, broker, result backend, FHIR destinations)."""
        from worker.logsetup import mask_urls

        return mask_urls(self.model_dump(mode="json"))


_current_toml: dict[str, Path | None] = {"path": None}


def config_path(explicit: Path | str | None = None) -> Path | None:
    """The TOML file to read: ``explicit``, else ``$RETINALGPT_CONFIG``, else none (all defaults)."""
    chosen = explicit if explicit is not None else os.environ.get(CONFIG_ENV)
    return Path(chosen) if chosen else None


def load_settings(path: Path | str | None = None, **overrides: Any) -> Settings:
    """Load and validate the configuration; raise :class:`ConfigError` with one line naming the key."""
    toml = config_path(path)
    if toml is not None and not toml.is_file():
        raise ConfigError(f"configuration file {toml} does not exist")
    _current_toml["path"] = toml
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, toml)) from None
    except (ValueError, OSError) as exc:  # TOML syntax errors surface as ValueError (tomllib.TOMLDecodeError)
        raise ConfigError(f"{toml}: {exc}") from None
    finally:
        _current_toml["path"] = None
    settings._toml_file = toml
    return settings


def _one_line(exc: ValidationError, toml: Path | None) -> str:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    where = f"{toml}: " if toml else ""
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    value = f", got {err['input']!r}" if err["type"] not in {"missing", "value_error"} and "input" in err else ""
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{where}invalid configuration key {key}: {msg}{value}{more}"
