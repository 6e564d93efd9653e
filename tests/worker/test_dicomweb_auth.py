"""DICOMweb destination authentication against real HTTPS peers in front of a real Orthanc (DICOMweb plugin), as
cloud archives are reached: a TLS gateway that requires a client certificate of the test CA (mutual TLS), and
a bearer-token gateway (HTTPS, server certificate only). Right credentials deliver; a wrong token is
a 401, dead-lettered with the reason; a missing or foreign client certificate and an untrusted server
certificate are recorded TLS failures, retried per the destination's policy, never a crash."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.dicom_node.dicom_fixtures import Certificates, make_certificates
from tests.reporting.reporting_fixtures import make_source
from tests.support.dicomweb_peers import Gateway
from tests.support.orthanc import Orthanc
from tests.worker.delivery_world import World
from worker.config import Destination, load_settings
from worker.db import DeliveryState, FailureReason, StudyState
from worker.pipeline.dicomweb_delivery import store

TOKEN = "tok-3f9a1c"


@dataclass
class Peers:
    certs: Certificates
    foreign: Certificates
    pacs: Orthanc
    mtls: Gateway
    gateway: Gateway


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peers]:
    certs = make_certificates(tmp_path_factory.mktemp("pki"))
    foreign = make_certificates(tmp_path_factory.mktemp("foreign-pki"))  # a CA nobody here trusts
    server_only = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_only.load_cert_chain(str(certs.server_cert), str(certs.server_key))
    mutual = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(certs.ca))
    mutual.load_cert_chain(str(certs.server_cert), str(certs.server_key))
    mutual.verify_mode = ssl.CERT_REQUIRED  # only clients with a certificate of the test CA
    with Orthanc(tmp_path_factory.mktemp("orthanc"), dicomweb=True) as pacs, \
            Gateway(pacs.dicomweb_url, tls=mutual) as mtls, \
            Gateway(pacs.dicomweb_url, tls=server_only, token=TOKEN) as gateway:
        yield Peers(certs, foreign, pacs, mtls, gateway)


def _source(retina_rgb: np.ndarray) -> Dataset:
    return make_source("op8", retina_rgb[::8, ::8].copy(), generate_uid(), generate_uid())


def _mtls(peers: Peers, **auth: object) -> Destination:
    auth = {"kind": "mtls", "client_certificate": peers.certs.client_cert, "client_key": peers.certs.client_key,
            "ca_certificates": peers.certs.ca, **auth}
    return Destination(name="cloud", kind="dicomweb", url=peers.mtls.url, connect_timeout=2, timeout=20,
                       auth=auth)


def _bearer(peers: Peers, token: str = TOKEN, ca: Path | None = None) -> Destination:
    return Destination(name="cloud", kind="dicomweb", url=peers.gateway.url, connect_timeout=2, timeout=20,
                       auth={"kind": "bearer", "token": token, "ca_certificates": ca or peers.certs.ca})


def test_mutual_tls_stores_through_an_endpoint_that_requires_client_certificates(
        peers: Peers, retina_rgb, monkeypatch: pytest.MonkeyPatch) -> None:
    """The configured CA bundle wins over ``REQUESTS_CA_BUNDLE`` (set in many container images; requests let it
    replace the session's bundle, so the archive's certificate failed verification)."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(peers.foreign.ca))
    ds = _source(retina_rgb)
    result = store(_mtls(peers), str(ds.StudyInstanceUID), [ds])
    assert result.ok and result.stored == [str(ds.SOPInstanceUID)]
    assert list(peers.pacs.stored_files(str(ds.StudyInstanceUID))) == [str(ds.SOPInstanceUID)]


@pytest.mark.parametrize("client", ["none", "foreign"])
def test_a_missing_or_foreign_client_certificate_is_a_recorded_tls_failure(peers: Peers, retina_rgb,
                                                                           client: str) -> None:
    ds = _source(retina_rgb)
    if client == "none":
        destination = Destination(name="cloud", kind="dicomweb", url=peers.mtls.url, connect_timeout=2,
                                  timeout=20, auth={"ca_certificates": peers.certs.ca})
    else:
        destination = _mtls(peers, client_certificate=peers.foreign.client_cert,
                            client_key=peers.foreign.client_key)
    result = store(destination, str(ds.StudyInstanceUID), [ds])
    assert not result.ok and result.status is None and not result.permanent  # retried per policy
    assert result.detail.startswith("TLS failure") and "does it accept our client certificate?" in result.detail
    assert peers.pacs.stored_files(str(ds.StudyInstanceUID)) == {}


def test_an_untrusted_server_certificate_is_a_recorded_tls_failure(peers: Peers, retina_rgb) -> None:
    ds = _source(retina_rgb)
    for destination in (_mtls(peers, ca_certificates=peers.foreign.ca), _bearer(peers, ca=peers.foreign.ca)):
        result = store(destination, str(ds.StudyInstanceUID), [ds])
        assert not result.ok and result.status is None and not result.permanent
        assert result.detail.startswith("TLS failure") and "certificate verify failed" in result.detail
    assert peers.pacs.stored_files(str(ds.StudyInstanceUID)) == {}


def test_bearer_token_reaches_the_archive_through_the_gateway(peers: Peers, retina_rgb) -> None:
    ds = _source(retina_rgb)
    result = store(_bearer(peers), str(ds.StudyInstanceUID), [ds])
    assert result.ok and result.stored == [str(ds.SOPInstanceUID)]
    assert peers.gateway.seen[-1] == f"Bearer {TOKEN}"
    assert list(peers.pacs.stored_files(str(ds.StudyInstanceUID))) == [str(ds.SOPInstanceUID)]


def test_a_wrong_token_is_dead_lettered_with_the_reason(peers: Peers, tmp_path: Path, retina_rgb) -> None:
    world = World(tmp_path, retina_rgb,
                  f'name = "cloud"\nkind = "dicomweb"\nurl = "{peers.gateway.url}"\nconnect_timeout = 2\n'
                  f'auth = {{ kind = "bearer", token = "expired", ca_certificates = "{peers.certs.ca}" }}\n')
    assert world.deliver() == StudyState.FAILED
    rows = world.rows()
    assert rows and all(r.state == DeliveryState.DEAD and r.failure == FailureReason.REFUSED for r in rows)
    assert all(r.attempts == 1 and r.last_error.startswith("HTTP 401") for r in rows)
    assert peers.gateway.seen[-1] == "Bearer expired"
    assert peers.pacs.stored_files(world.study_uid) == {}


def test_mutual_tls_delivery_and_an_untrusted_server_retried_until_trusted(peers: Peers, tmp_path: Path,
                                                                          retina_rgb) -> None:
    """The delivery queue over mutual TLS: with the wrong CA bundle every row is retried with the TLS reason (no
    crash, nothing stored); with the right one the next attempt delivers the results into the study."""

    def destination(ca: Path) -> str:
        return (f'name = "cloud"\nkind = "dicomweb"\nurl = "{peers.mtls.url}"\nconnect_timeout = 2\n'
                f'auth = {{ kind = "mtls", client_certificate = "{peers.certs.client_cert}", '
                f'client_key = "{peers.certs.client_key}", ca_certificates = "{ca}" }}\n')

    world = World(tmp_path, retina_rgb, destination(peers.foreign.ca))
    assert world.deliver() == StudyState.DELIVERING
    rows = world.rows()
    assert rows and all(r.state == DeliveryState.RETRYING and r.attempts == 1 for r in rows)
    assert all(r.last_error.startswith("TLS failure") and "certificate verify failed" in r.last_error
               for r in rows)
    (tmp_path / "config.toml").write_text((tmp_path / "config.toml").read_text().replace(
        str(peers.foreign.ca), str(peers.certs.ca)))
    world.settings = load_settings(tmp_path / "config.toml")
    world.make_due()
    assert world.deliver() == StudyState.DELIVERED
    assert len(peers.pacs.stored_files(world.study_uid)) == len(rows)


@pytest.mark.parametrize(("auth", "needs"), [
    ({"kind": "bearer"}, "auth.token"),
    ({"kind": "basic", "password": "x"}, "auth.username"),
    ({"kind": "mtls", "client_key": "k.pem"}, "auth.client_certificate"),
])
def test_an_auth_kind_without_its_credentials_sends_nothing_and_is_permanent(peers: Peers, retina_rgb,
                                                                            auth: dict, needs: str) -> None:
    """Without the check the request went out unauthenticated (a 401 at best, an open archive at worst)."""
    ds = _source(retina_rgb)
    requests_before = len(peers.gateway.seen)
    destination = Destination(name="cloud", kind="dicomweb", url=peers.gateway.url, connect_timeout=2,
                              auth={**auth, "ca_certificates": peers.certs.ca})
    result = store(destination, str(ds.StudyInstanceUID), [ds])
    assert not result.ok and result.permanent and result.status is None
    assert result.detail == f"destination 'cloud': auth kind {auth['kind']!r} needs {needs}"
    assert len(peers.gateway.seen) == requests_before
