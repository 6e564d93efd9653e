"""Model-emitted numbers versus measured numbers.

RetinalGPT writes AutoMorph-style features ("{name} is {value:.3f}"); the measurement pipeline measures the same
features. Both are kept in the result; where they differ by more than the feature's tolerance the result records
a :class:`~model.schema.Disagreement`. A tolerance is ``max(absolute, relative × |measured|)``; the values below
are about the spread AutoMorph's features show between repeat photographs of one eye (variability of the
measurement, not a clinical threshold), so a flag means "the model's number is not the measured one".
"""

from __future__ import annotations

from dataclasses import dataclass

from model.schema import Disagreement, Measurement, Source


@dataclass(frozen=True)
class Tolerance:
    absolute: float
    relative: float = 0.0

    def of(self, measured: float) -> float:
        return max(self.absolute, self.relative * abs(measured))


TOLERANCES: dict[str, Tolerance] = {
    "Fractal_dimension": Tolerance(0.05),
    "Vessel_density": Tolerance(0.02, 0.2),
    "Average_width": Tolerance(0.0, 0.15),
    "Distance_tortuosity": Tolerance(0.0, 0.25),
    "Squared_curvature_tortuosity": Tolerance(0.0, 0.5),
    "Tortuosity_density": Tolerance(0.0, 0.25),
    "CRAE": Tolerance(0.0, 0.1),
    "CRVE": Tolerance(0.0, 0.1),
    "AVR": Tolerance(0.1),
    "CDR": Tolerance(0.1),
    "Disc": Tolerance(0.0, 0.15),
    "Cup": Tolerance(0.0, 0.2),
}
DEFAULT_TOLERANCE = Tolerance(0.0, 0.2)


def tolerance_for(key: str) -> Tolerance:
    """The tolerance of an AutoMorph key (vessel prefix and zone suffix ignored)."""
    for feature, tolerance in TOLERANCES.items():
        if feature in key:
            return tolerance
    return DEFAULT_TOLERANCE


def compare_measurements(model: list[Measurement], measured: list[Measurement]) -> list[Disagreement]:
    """Disagreements between model-emitted and measured values of the same feature (same key, zone, vessel and
    unit; values in different units are not compared). Sorted by key."""
    reference = {(m.key, m.zone, m.vessel, m.unit): m for m in measured if m.source == Source.MEASURED}
    out = []
    for item in model:
        if item.source != Source.MODEL:
            continue
        other = reference.get((item.key, item.zone, item.vessel, item.unit))
        if other is None:
            continue
        tolerance = tolerance_for(item.key).of(other.value)
        if abs(item.value - other.value) > tolerance:
            out.append(
                Disagreement(
                    key=item.key,
                    zone=item.zone,
                    vessel=item.vessel,
                    model_value=item.value,
                    measured_value=other.value,
                    tolerance=tolerance,
                )
            )
    return sorted(out, key=lambda d: (d.key, d.zone.value, d.vessel.value))
