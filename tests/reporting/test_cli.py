"""``retinalgpt report`` end to end on files, and the configuration → reporting parameter builders."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.reporting.reporting_fixtures import make_analysis
from worker.cli.app import app
from worker.config import load_settings
from worker.reporting_params import fhir_client, report_options


@pytest.fixture()
def inputs(source_factory, tmp_path):
    sources = source_factory("op8")
    paths = []
    for n, ds in enumerate(sources):
        path = tmp_path / f"img{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    analysis = tmp_path / "analysis.json"
    analysis.write_text(make_analysis(sources).model_dump_json())
    mask = np.zeros((int(sources[0].Rows), int(sources[0].Columns)), dtype=np.uint8)
    mask[100:110, :] = 255
    Image.fromarray(mask).save(tmp_path / "img0_vessels.png")
    config = tmp_path / "retinalgpt.toml"
    config.write_text(
        f'home = "{tmp_path / "var"}"\n[reporting]\nsegmentation = true\ninstitution_name = "Eye Clinic"\n'
    )
    return sources, paths, analysis, config, tmp_path


def test_report_writes_all_objects(inputs):
    sources, paths, analysis, config, tmp_path = inputs
    out = tmp_path / "out"
    args = [
        "report",
        str(analysis),
        "--out",
        str(out),
        "--config",
        str(config),
        "--json",
        "--vessel-mask",
        str(tmp_path / "img0_vessels.png"),
    ]
    for path in paths:
        args += ["--source", str(path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    files = {p.split("/")[-1] for p in json.loads(result.stdout)["files"]}
    assert files == {
        "sr.dcm",
        "seg-1.dcm",
        "seg-2.dcm",
        "key-image-1.dcm",
        "key-image-2.dcm",
        "report.pdf",
        "report-pdf.dcm",
        "fhir-bundle.json",
        "analysis.json",
    }
    sr = pydicom.dcmread(out / "sr.dcm")
    assert sr.StudyInstanceUID == sources[0].StudyInstanceUID and sr.InstitutionName == "Eye Clinic"
    seg = pydicom.dcmread(out / "seg-1.dcm")
    assert seg.SegmentSequence[0].SegmentLabel == "Retinal vessels"
    bundle = json.loads((out / "fhir-bundle.json").read_text())
    assert bundle["type"] == "transaction"
    assert (out / "report.pdf").read_bytes().startswith(b"%PDF")


def test_report_errors_are_one_line(inputs, tmp_path):
    _, paths, _, config, _ = inputs
    bad = tmp_path / "bad.json"
    bad.write_text('{"revision": 0}')
    result = CliRunner().invoke(
        app,
        [
            "report",
            str(bad),
            "--source",
            str(paths[0]),
            "--out",
            str(tmp_path / "o"),
            "--config",
            str(config),
        ],
    )
    assert result.exit_code == 1
    assert "is not a StudyAnalysis" in result.output and len(result.output.strip().splitlines()) == 1


def test_builders_from_configuration(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(f'''home = "{tmp_path}"
[reporting]
key_image = false
pdf_series_number = 77
[[destinations]]
name = "ehr"
kind = "fhir"
url = "https://ehr.example/fhir"
max_attempts = 3
auth = {{ kind = "bearer", token = "t0ken" }}
[[destinations]]
name = "broken"
kind = "fhir"
url = "https://ehr.example/fhir"
auth = {{ kind = "basic", username = "u" }}
''')
    cfg = load_settings(config)
    options = report_options(cfg.reporting)
    assert options.key_image is False and options.pdf_series_number == 77 and options.pdf is True
    client = fhir_client(cfg.destination("ehr"))
    assert client.max_attempts == 3 and client._client.headers["Authorization"] == "Bearer t0ken"
    client.close()
    from worker.config import ConfigError

    with pytest.raises(ConfigError, match="password"):
        fhir_client(cfg.destination("broken"))
