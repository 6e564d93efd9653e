"""Plain parameter objects for the DICOM node.

:mod:`worker` builds these from its configuration; this package never reads configuration itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path


class DuplicatePolicy(StrEnum):
    """What to do with a second instance that has a SOP Instance UID already stored."""

    KEEP_FIRST = "keep_first"
    REPLACE = "replace"


class UnsupportedSopPolicy(StrEnum):
    """What to do with storage SOP classes outside the analysable set (DESIGN step 1)."""

    STORE = "store"
    REJECT = "reject"


@dataclass(frozen=True, slots=True)
class TlsParams:
    """TLS secure transport (PS3.15 Annex B.1): our certificate and key, and the CAs used to verify the peer."""

    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None
    require_peer_certificate: bool = False


@dataclass(frozen=True, slots=True)
class CallerRule:
    """A calling AE title allowed to associate; ``host`` binds it to one peer address."""

    ae_title: str
    host: str | None = None


@dataclass(frozen=True, slots=True)
class ListenerParams:
    """Everything the storage SCP needs."""

    ae_title: str
    storage_root: Path
    bind_address: str = "0.0.0.0"
    port: int = 11112
    allowed_callers: tuple[CallerRule, ...] = ()
    duplicate_policy: DuplicatePolicy = DuplicatePolicy.KEEP_FIRST
    unsupported_sop_classes: UnsupportedSopPolicy = UnsupportedSopPolicy.STORE
    analyse_derived_images: bool = False
    fsync: bool = True
    max_pdu_size: int = 4 * 1024 * 1024
    network_timeout: float = 60.0
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    max_associations: int = 16
    max_connections_per_host: int = 8
    max_negotiating_connections: int = 32
    max_instance_bytes: int = 512 << 20
    min_free_bytes: int = 0
    """Free space the storage root's file system keeps: below it C-STORE is answered 0xA700 before anything is
    written (0: no check)."""
    tls: TlsParams | None = None

    @property
    def trusted_hosts(self) -> frozenset[str]:
        """Hosts named in an allow-list rule: exempt from the per-host and negotiation connection limits."""
        return frozenset(rule.host for rule in self.allowed_callers if rule.host)


@dataclass(frozen=True, slots=True)
class CompletionParams:
    """Stable-study detection (DESIGN step 2)."""

    stable_seconds: float = 10.0
    max_wait_seconds: float = 600.0
    poll_seconds: float = field(default=0.25)


@dataclass(frozen=True, slots=True)
class PeerParams:
    """A remote DICOM application entity we associate with as SCU."""

    ae_title: str
    host: str
    port: int
    calling_ae_title: str = "RETINALGPT"
    timeout: float = 30.0
    max_pdu_size: int = 4 * 1024 * 1024
    tls: TlsParams | None = None
