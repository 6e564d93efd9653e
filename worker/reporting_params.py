"""Configuration → :mod:`reporting` parameters (as :mod:`worker.dicom_params` does for :mod:`dicom_node`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker.config import ConfigError, Destination, ReportingSettings

if TYPE_CHECKING:
    from reporting import ReportOptions
    from reporting.fhir.client import FhirDeliveryClient


def report_options(cfg: ReportingSettings) -> ReportOptions:
    """``[reporting]`` as :class:`reporting.ReportOptions`."""
    from reporting import ReportOptions

    return ReportOptions(
        manufacturer=cfg.manufacturer,
        institution_name=cfg.institution_name,
        segmentation=cfg.segmentation,
        key_image=cfg.key_image,
        pdf=cfg.pdf,
        sr_series_number=cfg.sr_series_number,
        seg_series_number=cfg.seg_series_number,
        key_image_series_number=cfg.key_image_series_number,
        pdf_series_number=cfg.pdf_series_number,
        fhir_patient_system=cfg.fhir_patient_system,
    )


def fhir_client(dest: Destination, *, max_attempts: int | None = None) -> FhirDeliveryClient:
    """The delivery client of a ``kind = "fhir"`` destination, with its auth, timeout and retry policy.
    ``max_attempts`` overrides the destination's (the pipeline retries across tasks itself and passes 1)."""
    from reporting.fhir.client import FhirAuthOptions, FhirDeliveryClient

    if dest.kind != "fhir" or dest.url is None:
        raise ConfigError(f"destination {dest.name!r} is not a FHIR destination")
    auth = dest.auth
    try:
        options = FhirAuthOptions(
            kind=auth.kind,
            token=auth.token.get_secret_value() if auth.token else None,
            username=auth.username,
            password=auth.password.get_secret_value() if auth.password else None,
            client_certificate=auth.client_certificate,
            client_key=auth.client_key,
            ca_certificates=auth.ca_certificates,
        )
    except ValueError as exc:
        raise ConfigError(f"destination {dest.name!r}: {exc}") from None
    return FhirDeliveryClient(
        dest.url,
        options,
        timeout=dest.timeout,
        max_attempts=max_attempts or dest.max_attempts,
        backoff_seconds=dest.backoff_seconds,
    )
