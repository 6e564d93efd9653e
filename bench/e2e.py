"""End-to-end latency and throughput of the whole product on this machine.

(a) Latency: time from the last C-STORE of a 2-image OP study (768 px, from skimage's retina image) to its SR
    stored in Orthanc, p50/p95 over N studies sent one after another, embedded default (SQLite + kombu's
    SQLAlchemy broker) on CPU, `retinalgpt up` roles. The completion rule waits ``--stable`` seconds after the
    last instance (default 2 here; production default 10), which is part of the latency and printed apart.
(b) Throughput: studies/minute with 1 and 2 inference workers on PostgreSQL + Redis, M studies sent at once,
    timed until the last SR is in Orthanc.

Run: ``.venv/bin/python bench/e2e.py [--studies 20] [--burst 6] [--stable 2]``. Needs Orthanc, and PostgreSQL
and Redis on loopback for (b).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the test-support peers (Orthanc, services)

import numpy as np
from PIL import Image
from pydicom.uid import generate_uid
from skimage import data

from dicom_node.params import PeerParams
from dicom_node.sender import send_datasets
from model.schema import Laterality
from tests.support.net import free_port
from tests.support.orthanc import Orthanc
from tests.support.roles import Roles, retinalgpt, wait_for
from tests.support.services import postgres_database, redis_database
from worker.pipeline.sources import ophthalmic_photograph

SR = "1.2.840.10008.5.1.4.1.1.88.34"
RIGHT = np.asarray(Image.fromarray(data.retina()).resize((768, 768), Image.Resampling.LANCZOS))


def study() -> list:
    study_uid, series_uid = generate_uid(), generate_uid()
    return [ophthalmic_photograph(np.ascontiguousarray(pixels), study_instance_uid=study_uid,
                                  series_instance_uid=series_uid, patient_id="BENCH", patient_name="Bench^Eye",
                                  laterality=eye, instance_number=n)
            for n, (eye, pixels) in enumerate(((Laterality.RIGHT, RIGHT), (Laterality.LEFT, RIGHT[:, ::-1])), 1)]


def config(home: Path, node_port: int, pacs: Orthanc, stable: float, database: str | None = None,
           broker: str | None = None) -> Path:
    lines = [f'home = "{home}"', "[dicom]", 'bind_address = "127.0.0.1"', f"port = {node_port}",
             'allowed_callers = [{ ae_title = "BENCHCAM" }]', f"stable_seconds = {stable}",
             "[[destinations]]", 'name = "pacs"', 'kind = "dicom"', f'ae_title = "{pacs.ae_title}"',
             'host = "127.0.0.1"', f"port = {pacs.dicom_port}", "backoff_seconds = 0.5"]
    if database:
        lines += ["[database]", f'url = "{database}"']
    if broker:
        lines += ["[broker]", f'url = "{broker}"', f'result_backend = "{broker}"']
    path = home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def has_sr(pacs: Orthanc, study_uid: str) -> bool:
    return SR in pacs.sop_classes_in_study(study_uid)


def send(node_port: int, datasets: list) -> None:
    result = send_datasets(PeerParams(ae_title="RETINALGPT", host="127.0.0.1", port=node_port,
                                      calling_ae_title="BENCHCAM"), datasets)
    if not result.ok:
        raise RuntimeError(f"C-STORE failed: {result}")


def latency(root: Path, studies: int, stable: float) -> list[float]:
    node_port = free_port()
    with Orthanc(root / "orthanc") as pacs:
        home = root / "home"
        home.mkdir()
        cfg = config(home, node_port, pacs, stable)
        retinalgpt("db", "upgrade", config=cfg)
        roles = Roles(cfg, root / "logs")
        roles.start("up", "up", "--no-api")
        try:
            wait_for(lambda: _echo(node_port), 120, "node")
            warm = study()  # warm-up: loads the model and the measurement pipeline in the worker
            send(node_port, warm)
            wait_for(lambda: has_sr(pacs, str(warm[0].StudyInstanceUID)), 600, "warm-up SR", interval=0.2)
            times = []
            for n in range(studies):
                datasets = study()
                send(node_port, datasets)
                sent = time.monotonic()
                wait_for(lambda: has_sr(pacs, str(datasets[0].StudyInstanceUID)), 600, "SR", interval=0.1)
                times.append(time.monotonic() - sent)
                print(f"  study {n + 1}/{studies}: {times[-1]:.1f} s", flush=True)
            return times
        finally:
            roles.stop_all()


def _echo(port: int) -> bool:
    from dicom_node.sender import echo

    return echo(PeerParams(ae_title="RETINALGPT", host="127.0.0.1", port=port, calling_ae_title="BENCHCAM")).ok


def throughput(root: Path, workers: int, burst: int, stable: float) -> float:
    node_port = free_port()
    with postgres_database("bench") as database, redis_database() as broker, Orthanc(root / "orthanc") as pacs:
        home = root / "home"
        home.mkdir()
        cfg = config(home, node_port, pacs, stable, database, broker)
        retinalgpt("db", "upgrade", config=cfg)
        roles = Roles(cfg, root / "logs")
        roles.start("node", "node")
        roles.start("delivery", "worker", "--queues", "delivery")
        for n in range(workers):
            roles.start(f"inference-{n}", "worker", "--queues", "inference")
        try:
            wait_for(lambda: _echo(node_port), 120, "node")
            warm = study()
            send(node_port, warm)
            wait_for(lambda: has_sr(pacs, str(warm[0].StudyInstanceUID)), 600, "warm-up SR", interval=0.2)
            batch = [study() for _ in range(burst)]
            start = time.monotonic()
            for datasets in batch:
                send(node_port, datasets)
            for datasets in batch:
                wait_for(lambda d=datasets: has_sr(pacs, str(d[0].StudyInstanceUID)), 1800, "SR", interval=0.2)
            return burst / ((time.monotonic() - start) / 60.0)
        finally:
            roles.stop_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--burst", type=int, default=6)
    parser.add_argument("--stable", type=float, default=2.0)
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rg-bench-e2e-") as tmp:
        times = latency(Path(tmp) / "latency", args.studies, args.stable)
    cuts = statistics.quantiles(times, n=20, method="inclusive")  # never beyond the max
    print(f"(a) last C-STORE → SR in Orthanc, {len(times)} studies of 2 images, embedded default, CPU:")
    print(f"    p50 {statistics.median(times):.1f} s, p95 {cuts[18]:.1f} s, max {max(times):.1f} s "
          f"(includes stable_seconds = {args.stable:g} s); target p95 <= 15 s")
    if args.skip_throughput:
        return
    rates = {}
    for workers in (1, 2):
        with tempfile.TemporaryDirectory(prefix="rg-bench-e2e-") as tmp:
            rates[workers] = throughput(Path(tmp), workers, args.burst, args.stable)
        print(f"(b) PostgreSQL + Redis, {workers} inference worker(s): {rates[workers]:.2f} studies/min", flush=True)
    print(f"    scaling 2 vs 1 workers: {rates[2] / rates[1]:.2f}x (2 CPU cores shared by every role)")


if __name__ == "__main__":
    main()
