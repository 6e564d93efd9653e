"""FHIR delivery against a local FHIR server: idempotent transactions, retries, permanent failures, auth."""

from __future__ import annotations

import ssl
import subprocess

import httpx
import pytest

from reporting.fhir.bundle import build_bundle
from reporting.fhir.client import NO_AUTH, FhirAuthOptions, FhirDeliveryClient
from tests.conftest import free_port
from tests.reporting.reporting_fhir_server import FhirTestServer
from tests.reporting.reporting_fixtures import make_analysis


@pytest.fixture(scope="module")
def sources(source_factory):
    return source_factory("op8")


def _client(url: str, auth: FhirAuthOptions = NO_AUTH, attempts: int = 4, sleeps: list | None = None):
    return FhirDeliveryClient(
        url,
        auth,
        timeout=5.0,
        max_attempts=attempts,
        backoff_seconds=0.5,
        sleep=(sleeps.append if sleeps is not None else lambda s: None),
    )


def test_second_post_creates_nothing_new(sources):
    bundle = build_bundle(make_analysis(sources), sources, pdf=b"%PDF-1.4\n")
    with FhirTestServer() as server, _client(server.url) as client:
        first = client.post_transaction(bundle)
        assert first.ok and first.status == 200 and first.attempts == 1
        counts = {rtype: server.store.count(rtype) for rtype in server.store.resources}
        assert counts["Patient"] == 1 and counts["ImagingStudy"] == 1 and counts["Device"] == 2
        assert counts["DiagnosticReport"] == 1 and counts["Provenance"] == 1
        assert counts["Observation"] == 7
        created = server.store.created
        assert client.post_transaction(bundle).ok
        assert {rtype: server.store.count(rtype) for rtype in server.store.resources} == counts
        assert server.store.created == created
        report = next(iter(server.store.resources["DiagnosticReport"].values()))
        assert report["subject"]["reference"].startswith("Patient/")
        assert all(r["reference"].startswith("Observation/") for r in report["result"])
        assert report["meta"]["versionId"] == "2"
        search = httpx.get(
            f"{server.url}/DiagnosticReport",
            params={"identifier": report["identifier"][0]["system"] + "|" + report["identifier"][0]["value"]},
        ).json()
        assert search["total"] == 1


def test_new_revision_amends_in_place(sources):
    with FhirTestServer() as server, _client(server.url) as client:
        assert client.post_transaction(build_bundle(make_analysis(sources), sources)).ok
        reports = server.store.count("DiagnosticReport")
        assert client.post_transaction(build_bundle(make_analysis(sources, revision=2), sources)).ok
        assert server.store.count("DiagnosticReport") == reports
        (report,) = server.store.resources["DiagnosticReport"].values()
        assert report["status"] == "preliminary"  # unsigned revisions stay preliminary
        assert server.store.count("Provenance") == 2  # one provenance record per revision


def test_transient_failures_are_retried_with_backoff(sources):
    bundle = build_bundle(make_analysis(sources), sources)
    sleeps: list[float] = []
    with FhirTestServer() as server, _client(server.url, attempts=5, sleeps=sleeps) as client:
        server.fail_next.extend([503, 429, 500])
        result = client.post_transaction(bundle)
        assert result.ok and result.attempts == 4
        assert sleeps == [0.5, 1.0, 2.0]
        assert server.store.count("DiagnosticReport") == 1


def test_attempts_run_out_is_not_permanent(sources):
    with FhirTestServer() as server, _client(server.url, attempts=2) as client:
        server.fail_next.extend([502, 502, 502])
        result = client.post_transaction(build_bundle(make_analysis(sources), sources))
        assert not result.ok and not result.permanent and result.status == 502 and result.attempts == 2


def test_client_error_is_permanent(sources):
    with FhirTestServer() as server, _client(server.url) as client:
        server.fail_next.append(422)
        result = client.post_transaction(build_bundle(make_analysis(sources), sources))
        assert not result.ok and result.permanent and result.status == 422 and result.attempts == 1
        assert "injected failure 422" in result.detail
        assert server.requests == 1


def test_timeout_is_retried(sources):
    with FhirTestServer() as server:
        server.stall_next.append(1.5)
        client = FhirDeliveryClient(
            server.url, timeout=0.5, max_attempts=3, backoff_seconds=0, sleep=lambda s: None
        )
        with client:
            result = client.post_transaction(build_bundle(make_analysis(sources), sources))
        assert result.ok and result.attempts == 2


def test_connection_error_is_retried():
    sleeps: list[float] = []
    with _client(f"http://127.0.0.1:{free_port()}/fhir", attempts=3, sleeps=sleeps) as client:
        result = client.post_transaction({"resourceType": "Bundle", "type": "transaction", "entry": []})
    assert not result.ok and not result.permanent and result.status is None and result.attempts == 3
    assert "ConnectError" in result.detail and sleeps == [0.5, 1.0]


@pytest.mark.parametrize(
    "auth, header",
    [
        (FhirAuthOptions(kind="bearer", token="s3cret"), "Bearer s3cret"),
        (
            FhirAuthOptions(kind="basic", username="ehr", password="pw"),
            httpx.BasicAuth("ehr", "pw")._auth_header,
        ),
    ],
    ids=["bearer", "basic"],
)
def test_auth(sources, auth, header):
    bundle = build_bundle(make_analysis(sources), sources)
    with FhirTestServer(require_authorization=header) as server:
        with _client(server.url, auth) as client:
            assert client.post_transaction(bundle).ok
        with _client(server.url) as anonymous:
            denied = anonymous.post_transaction(bundle)
        assert not denied.ok and denied.permanent and denied.status == 401


def test_auth_options_need_their_secrets():
    with pytest.raises(ValueError, match="token"):
        FhirAuthOptions(kind="bearer")
    with pytest.raises(ValueError, match="client_certificate"):
        FhirAuthOptions(kind="mtls")


def _openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A throw-away CA with a server certificate for 127.0.0.1 and a client certificate."""
    folder = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
        cwd=folder,
    )
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        (folder / f"{name}.ext").write_text(ext + "\n")
        _openssl(
            "req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=folder
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "1",
            "-extfile",
            f"{name}.ext",
            cwd=folder,
        )
    return folder


def test_mutual_tls(sources, pki):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.pem"))
    context.load_cert_chain(str(pki / "server.pem"), str(pki / "server.key"))
    context.verify_mode = ssl.CERT_REQUIRED
    bundle = build_bundle(make_analysis(sources), sources)
    with FhirTestServer(tls=context) as server:
        auth = FhirAuthOptions(
            kind="mtls",
            client_certificate=pki / "client.pem",
            client_key=pki / "client.key",
            ca_certificates=pki / "ca.pem",
        )
        with _client(server.url, auth) as client:
            assert client.post_transaction(bundle).ok
        assert server.store.count("DiagnosticReport") == 1
        without_certificate = FhirAuthOptions(ca_certificates=pki / "ca.pem")
        with _client(server.url, without_certificate, attempts=1) as client:
            refused = client.post_transaction(bundle)
        assert not refused.ok and refused.status is None
