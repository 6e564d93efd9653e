"""Build :mod:`dicom_node`'s parameter objects from the configuration (dicom_node never reads it)."""

from __future__ import annotations

from dicom_node.params import (
    CallerRule,
    CompletionParams,
    DuplicatePolicy,
    ListenerParams,
    PeerParams,
    TlsParams,
    UnsupportedSopPolicy,
)
from worker.config import Archive, ConfigError, Destination, Settings, TlsSettings


def tls_params(tls: TlsSettings) -> TlsParams | None:
    if not tls.enabled:
        return None
    return TlsParams(
        certificate=tls.certificate,
        private_key=tls.private_key,
        ca_certificates=tls.ca_certificates,
        require_peer_certificate=tls.require_client_certificate,
    )


def listener_params(settings: Settings) -> ListenerParams:
    dicom = settings.dicom
    return ListenerParams(
        ae_title=dicom.ae_title,
        storage_root=settings.storage.path,
        bind_address=dicom.bind_address,
        port=dicom.port,
        allowed_callers=tuple(CallerRule(c.ae_title, c.host) for c in dicom.allowed_callers),
        duplicate_policy=DuplicatePolicy(dicom.duplicate_policy.value),
        unsupported_sop_classes=UnsupportedSopPolicy(dicom.unsupported_sop_classes.value),
        analyse_derived_images=dicom.analyse_derived_images,
        fsync=settings.storage.fsync,
        max_pdu_size=dicom.max_pdu_size,
        network_timeout=dicom.network_timeout,
        acse_timeout=dicom.acse_timeout,
        dimse_timeout=dicom.dimse_timeout,
        max_associations=dicom.max_associations,
        max_connections_per_host=dicom.max_connections_per_host,
        max_negotiating_connections=dicom.max_negotiating_connections,
        max_instance_bytes=int(dicom.max_instance_mb * (1 << 20)),
        min_free_bytes=settings.storage.min_free_bytes,
        tls=tls_params(dicom.tls),
    )


def completion_params(settings: Settings) -> CompletionParams:
    return CompletionParams(
        stable_seconds=settings.dicom.stable_seconds, max_wait_seconds=settings.dicom.max_wait_seconds
    )


def peer_params(settings: Settings, destination: Destination | str) -> PeerParams:
    """The DICOM peer of a destination of kind ``dicom`` (name or object); our AE title calls it."""
    dest = settings.destination(destination) if isinstance(destination, str) else destination
    if dest.kind != "dicom" or dest.ae_title is None or dest.host is None or dest.port is None:
        raise ConfigError(f"destination {dest.name!r} is not a DICOM destination")
    return _called_peer(settings, dest.ae_title, dest.host, dest.port, dest.timeout, dest.tls)


def archive_params(settings: Settings, archive: Archive) -> PeerParams:
    """The query/retrieve peer of an ``[[archives]]`` entry; our AE title calls it."""
    return _called_peer(settings, archive.ae_title, archive.host, archive.port, archive.timeout, archive.tls)


def _called_peer(settings: Settings, ae_title: str, host: str, port: int, timeout: float,
                 tls: TlsSettings) -> PeerParams:
    """A peer our node calls: its address, with our AE title, PDU size and the peer's TLS settings."""
    return PeerParams(
        ae_title=ae_title,
        host=host,
        port=port,
        calling_ae_title=settings.dicom.ae_title,
        timeout=timeout,
        max_pdu_size=settings.dicom.max_pdu_size,
        tls=tls_params(tls),
    )
