"""TLS contexts for the DICOM TLS secure transport connection profile (PS3.15 Annex B.1)."""

from __future__ import annotations

import ssl

from dicom_node.params import TlsParams


def server_context(params: TlsParams) -> ssl.SSLContext:
    """A server context presenting our certificate; verifies client certificates against the CA bundle
    when one is given, and requires them when ``require_peer_certificate`` is set."""
    if params.certificate is None or params.private_key is None:
        raise ValueError("a TLS listener needs a certificate and a private key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(params.certificate, params.private_key)
    if params.ca_certificates is not None:
        context.load_verify_locations(cafile=params.ca_certificates)
        context.verify_mode = ssl.CERT_REQUIRED if params.require_peer_certificate else ssl.CERT_OPTIONAL
    return context


def client_context(params: TlsParams) -> ssl.SSLContext:
    """A client context verifying the peer (CA bundle if given, else the system store) and presenting our
    certificate when one is configured."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=params.ca_certificates)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if params.certificate is not None and params.private_key is not None:
        context.load_cert_chain(params.certificate, params.private_key)
    return context
