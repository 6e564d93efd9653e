"""Model numbers versus measured numbers: per-feature tolerances."""

from __future__ import annotations

from model.compare import compare_measurements, tolerance_for
from model.engine import model_measurement
from model.schema import Measurement, Source, VesselType, Zone


def measured(
    key: str, value: float, unit: str = "1", zone: Zone = Zone.WHOLE, vessel: VesselType = VesselType.ALL
) -> Measurement:
    return Measurement(key=key, value=value, unit=unit, zone=zone, vessel=vessel, source=Source.MEASURED)


def test_disagreements_beyond_tolerance_are_reported() -> None:
    model = [
        model_measurement("Fractal_dimension", 1.52),
        model_measurement("Vessel_density", 0.081),
        model_measurement("CRAE_Knudtson_zone_b", 150.0),
        model_measurement("Artery_Average_width_zone_c", 10.0),
    ]
    real = [
        measured("Fractal_dimension", 1.45),
        measured("Vessel_density", 0.075),
        measured("CRAE_Knudtson_zone_b", 120.0, unit="px", zone=Zone.B, vessel=VesselType.ARTERY),
        measured("Artery_Average_width_zone_c", 9.0, unit="um", zone=Zone.C, vessel=VesselType.ARTERY),
    ]
    found = compare_measurements(model, real)
    assert [d.key for d in found] == ["CRAE_Knudtson_zone_b", "Fractal_dimension"]
    crae = found[0]
    assert (crae.model_value, crae.measured_value, crae.zone, crae.vessel) == (
        150.0,
        120.0,
        Zone.B,
        VesselType.ARTERY,
    )
    assert crae.tolerance == tolerance_for("CRAE_Knudtson_zone_b").of(120.0) == 12.0


def test_model_values_are_typed_like_measured_ones() -> None:
    m = model_measurement("Vein_Tortuosity_density_zone_b", 0.7)
    assert (m.zone, m.vessel, m.unit, m.source) == (Zone.B, VesselType.VEIN, "1", Source.MODEL)
    assert model_measurement("CDR_vertical", 0.5).unit == "1"
    assert model_measurement("Disc_height", 180.0).unit == "px"
    assert compare_measurements([], [measured("Fractal_dimension", 1.4)]) == []
