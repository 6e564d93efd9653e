"""The question protocol: canonical rendering, strict parsing of real-looking answers (including the paper's
failure modes), exact round trips, and parsing that never raises."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model import protocol
from model.protocol import ImageLabels, Task, parse_answer, render_answer
from model.schema import Condition, LesionType, QualityGrade, max_grade
from model.template import NATIVE_TEMPLATE

DR, DME, GLAUCOMA, AMD = (
    Condition.DIABETIC_RETINOPATHY,
    Condition.DIABETIC_MACULAR_EDEMA,
    Condition.GLAUCOMA,
    Condition.AGE_RELATED_MACULAR_DEGENERATION,
)


def test_canonical_answers_look_like_the_paper() -> None:
    labels = ImageLabels(
        quality=QualityGrade.GRADABLE,
        findings={GLAUCOMA: 0, DR: 2},
        measurements={"Vessel_density": 0.0712, "Fractal_dimension": 1.45234},
        lesions=(
            (LesionType.HARD_EXUDATE, (0.5, 0.5, 0.51, 0.52)),
            (LesionType.MICROANEURYSM, (0.12, 0.34, 0.13, 0.35)),
        ),
    )
    assert (
        render_answer(Task.MODALITY_QUALITY, labels)
        == "This is a colour fundus photograph. Image quality: good."
    )
    assert render_answer(Task.DISEASE_GRADE, labels) == "Diabetic retinopathy: grade 2.\nGlaucoma: absent."
    assert render_answer(Task.VASCULAR, labels) == "Fractal_dimension is 1.452\nVessel_density is 0.071"
    assert render_answer(Task.LESIONS, labels) == (
        "Microaneurysm: [0.1200, 0.3400, 0.1300, 0.3500].\nHard exudate: [0.5000, 0.5000, 0.5100, 0.5200]."
    )
    assert render_answer(Task.LESIONS, ImageLabels(lesions=())) == "No lesions detected."


def test_render_rejects_labels_it_cannot_express() -> None:
    with pytest.raises(ValueError):
        render_answer(Task.DISEASE_GRADE, ImageLabels())
    with pytest.raises(ValueError):
        render_answer(Task.DISEASE_GRADE, ImageLabels(findings={DR: 5}))
    with pytest.raises(ValueError):
        render_answer(Task.DISEASE_GRADE, ImageLabels(findings={Condition.REFERABLE_DIABETIC_RETINOPATHY: 1}))
    with pytest.raises(ValueError):
        render_answer(Task.VASCULAR, ImageLabels(measurements={"Made_up_feature": 1.0}))
    with pytest.raises(ValueError):
        render_answer(Task.LESIONS, ImageLabels(lesions=((LesionType.DRUSEN, (0.5, 0.5, 0.4, 0.6)),)))


# (task, answer, expected content, ok)
CORPUS: list[tuple[Task, str, dict, bool]] = [
    # modality and quality: canonical and prose variants
    (
        Task.MODALITY_QUALITY,
        "This is a colour fundus photograph. Image quality: usable.",
        {"quality": QualityGrade.USABLE},
        True,
    ),
    (
        Task.MODALITY_QUALITY,
        "This is a color fundus photo of excellent quality.",
        {"quality": QualityGrade.GRADABLE},
        True,
    ),
    (
        Task.MODALITY_QUALITY,
        "The image is a fundus image. The image quality is poor due to blur.",
        {"quality": QualityGrade.REJECT},
        True,
    ),
    (
        Task.MODALITY_QUALITY,
        "This is an optical coherence tomography scan.",
        {"modality": "optical coherence tomography scan"},
        True,
    ),
    (Task.MODALITY_QUALITY, "Image quality: good and poor.", {"quality": None}, False),
    (Task.MODALITY_QUALITY, "I cannot tell.", {"quality": None}, False),
    # disease: canonical, severity words, prose, extra prose, failure modes
    (
        Task.DISEASE_GRADE,
        "Diabetic retinopathy: grade 3.\nDiabetic macular edema: grade 1.",
        {"findings": {DR: 3, DME: 1}},
        True,
    ),
    (
        Task.DISEASE_GRADE,
        "The image shows moderate non-proliferative diabetic retinopathy.",
        {"findings": {DR: 2}},
        True,
    ),
    (Task.DISEASE_GRADE, "Proliferative diabetic retinopathy (PDR) is present.", {"findings": {DR: 4}}, True),
    (
        Task.DISEASE_GRADE,
        "There is no diabetic retinopathy. No signs of glaucoma.",
        {"findings": {DR: 0, GLAUCOMA: 0}},
        True,
    ),
    (
        Task.DISEASE_GRADE,
        "Diabetic retinopathy: grade 1. The retina otherwise looks healthy, see a doctor.",
        {"findings": {DR: 1}},
        True,
    ),
    (
        Task.DISEASE_GRADE,
        "DR grade 2. Age-related macular degeneration: present.",
        {"findings": {DR: 2, AMD: 1}},
        True,
    ),
    (Task.DISEASE_GRADE, "Diabetic macular oedema: 2", {"findings": {DME: 2}}, True),
    (Task.DISEASE_GRADE, "Diabetic retinopathy: grade 7.", {"findings": {}}, False),
    (Task.DISEASE_GRADE, "Diabetic retinopathy: grade.", {"findings": {}}, False),
    (Task.DISEASE_GRADE, "Diabetic retinopathy: grade 2.5.", {"findings": {}}, False),
    (Task.DISEASE_GRADE, "Diabetic retinopathy: [0.1200, 0.3400, 0.1300, 0.3500].", {"findings": {}}, False),
    (
        Task.DISEASE_GRADE,
        "Diabetic retinopathy: grade 2.\nDiabetic retinopathy: grade 3.",
        {"findings": {}},
        False,
    ),
    (
        Task.DISEASE_GRADE,
        "Glaucoma: suspected.\nDiabetic retinopathy: grade 0.",
        {"findings": {DR: 0}},
        False,
    ),
    (Task.DISEASE_GRADE, "The fundus looks unremarkable.", {"findings": {}}, False),
    # vascular: canonical, prose, units, separators, failure modes
    (
        Task.VASCULAR,
        "Fractal_dimension is 1.452\nVessel_density is 0.071",
        {"measurements": {"Fractal_dimension": 1.452, "Vessel_density": 0.071}},
        True,
    ),
    (
        Task.VASCULAR,
        "The fractal dimension is 1.45, Artery_Average_width_zone_b is 9.120 px.",
        {"measurements": {"Fractal_dimension": 1.45, "Artery_Average_width_zone_b": 9.12}},
        True,
    ),
    (
        Task.VASCULAR,
        "CRAE_Knudtson_zone_c is 140.201; AVR_Knudtson_zone_c is 0.713. These are normal.",
        {"measurements": {"CRAE_Knudtson_zone_c": 140.201, "AVR_Knudtson_zone_c": 0.713}},
        True,
    ),
    (Task.VASCULAR, "Fractal_dimension is [0.1234, 0.2345, 0.3456, 0.4567]", {"measurements": {}}, False),
    (
        Task.VASCULAR,
        "Fractal_dimension is 1.452 [0.1, 0.2, 0.3, 0.4]\nVessel_density is 0.071",
        {"measurements": {"Vessel_density": 0.071}},
        False,
    ),
    (Task.VASCULAR, "Fractal_dimension is\nVessel_density is N/A", {"measurements": {}}, False),
    (Task.VASCULAR, "Fractal_dimension is nan", {"measurements": {}}, False),
    (Task.VASCULAR, "Magic_index is 3.000", {"measurements": {}}, False),
    (Task.VASCULAR, "Fractal_dimension is 1.452\nFractal_dimension is 1.390", {"measurements": {}}, False),
    # lesions: canonical, aliases, none, failure modes
    (
        Task.LESIONS,
        "Microaneurysm: [0.1200, 0.3400, 0.1300, 0.3500], [0.5000, 0.5000, 0.5100, 0.5200].",
        {
            "lesions": (
                (LesionType.MICROANEURYSM, (0.12, 0.34, 0.13, 0.35)),
                (LesionType.MICROANEURYSM, (0.5, 0.5, 0.51, 0.52)),
            )
        },
        True,
    ),
    (
        Task.LESIONS,
        "hemorrhages: [0.1, 0.2, 0.3, 0.4]; cotton wool spots: [0.5, 0.5, 0.6, 0.6]",
        {
            "lesions": (
                (LesionType.HAEMORRHAGE, (0.1, 0.2, 0.3, 0.4)),
                (LesionType.SOFT_EXUDATE, (0.5, 0.5, 0.6, 0.6)),
            )
        },
        True,
    ),
    (Task.LESIONS, "No lesions detected.", {"lesions": ()}, True),
    (Task.LESIONS, "Microaneurysm: [0.1200, 0.3400, 0.1300, 0.3500] is 0.25", {"lesions": None}, False),
    (Task.LESIONS, "Microaneurysm: [0.1200, 0.3400, 0.1300]", {"lesions": None}, False),
    (Task.LESIONS, "Haemorrhage: [0.9, 0.2, 0.3, 0.4]", {"lesions": None}, False),
    (Task.LESIONS, "Drusen: [1.2, 0.2, 1.3, 0.4]", {"lesions": None}, False),
    (Task.LESIONS, "Drusen: Fractal_dimension is 1.452", {"lesions": None}, False),
    (Task.LESIONS, "No lesions detected.\nDrusen: [0.1, 0.2, 0.3, 0.4].", {}, False),
    (Task.LESIONS, "Unicorn: [0.1, 0.2, 0.3, 0.4].", {"lesions": None}, False),
]


@pytest.mark.parametrize(
    ("task", "text", "expected", "ok"), CORPUS, ids=[f"{t.value}-{i}" for i, (t, *_) in enumerate(CORPUS)]
)
def test_parser_corpus(task: Task, text: str, expected: dict, ok: bool) -> None:
    parsed = parse_answer(task, text)
    assert parsed.ok is ok, parsed.errors
    assert parsed.text == text
    assert (parsed.error is None) is ok
    for field, value in expected.items():
        got = getattr(parsed, field)
        assert (dict(got) if isinstance(got, dict) else got) == value, field


def test_unknown_task_and_non_text_are_flagged_not_raised() -> None:
    assert not parse_answer("diagnosis", "Glaucoma: present.").ok
    assert not parse_answer(Task.LESIONS, None).ok  # type: ignore[arg-type]


finite = st.floats(min_value=0, max_value=500, allow_nan=False, allow_infinity=False)
unit = st.floats(min_value=0, max_value=1, allow_nan=False)


@st.composite
def boxes(draw: st.DrawFn) -> tuple[float, float, float, float]:
    x = sorted((draw(unit), draw(unit)))
    y = sorted((draw(unit), draw(unit)))
    return (x[0], y[0], x[1], y[1])


@st.composite
def labels(draw: st.DrawFn) -> ImageLabels:
    conditions = draw(st.sets(st.sampled_from(protocol.DISEASE_CONDITIONS), min_size=1))
    findings = {c: draw(st.integers(0, max_grade(c))) for c in conditions}
    keys = draw(st.sets(st.sampled_from(protocol.VASCULAR_FEATURES), min_size=1, max_size=12))
    lesions = draw(st.lists(st.tuples(st.sampled_from(list(LesionType)), boxes()), max_size=6))
    return ImageLabels(
        modality=draw(st.sampled_from(protocol.MODALITIES)),
        quality=draw(st.none() | st.sampled_from(list(QualityGrade))),
        findings=findings,
        measurements={k: draw(finite) for k in keys},
        lesions=tuple(lesions),
    )


@settings(max_examples=150, deadline=None)
@given(labels())
def test_render_then_parse_is_exact(example: ImageLabels) -> None:
    canonical = example.canonical()
    read = ImageLabels()
    for task in example.tasks():
        parsed = parse_answer(task, render_answer(task, example))
        assert parsed.ok, parsed.errors
        read = ImageLabels(
            modality=parsed.modality or read.modality,
            quality=parsed.quality or read.quality,
            findings=parsed.findings or read.findings,
            measurements=parsed.measurements or read.measurements,
            lesions=parsed.lesions if parsed.lesions is not None else read.lesions,
        )
    assert read == canonical
    assert all(render_answer(t, canonical) == render_answer(t, example) for t in example.tasks())


answerish = st.text(
    alphabet=st.sampled_from(list("[](),.;:\n 0123456789-+eE.abcdefghijklmnopqrstuvwxyz_ABCDGHMRSV"))
    | st.characters(),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(list(Task)), answerish)
def test_parsing_never_raises(task: Task, text: str) -> None:
    parsed = parse_answer(task, text)
    assert parsed.text == text
    assert parsed.ok or parsed.errors
    for _, box in parsed.lesions or ():
        assert 0 <= box[0] <= box[2] <= 1 and 0 <= box[1] <= box[3] <= 1


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(list(Task)),
    st.lists(
        st.sampled_from(
            [
                "Diabetic retinopathy:",
                "grade",
                "3",
                "[0.1, 0.2, 0.3, 0.4]",
                "is",
                "Fractal_dimension",
                "Drusen:",
                ".",
                "\n",
                "No lesions detected.",
                "quality",
                "good",
                "poor",
                "present",
                "absent",
                ",",
                "nan",
                "1e9",
                "-0.5",
            ]
        ),
        max_size=20,
    ),
)
def test_parsing_protocol_fragments_never_raises(task: Task, words: list[str]) -> None:
    parsed = parse_answer(task, " ".join(words))
    assert parsed.ok or parsed.errors


def test_conversation_segments_concatenate_to_the_prompt() -> None:
    template = NATIVE_TEMPLATE
    turns = [("What is this?", "A fundus photograph."), ("Grade it.", None)]
    segments = template.segments(turns)
    text = "".join(t for t, _ in segments)
    assert text == template.prompt("Grade it.", history=[("What is this?", "A fundus photograph.")])
    assert [t for t, target in segments if target] == [" A fundus photograph.###"]
    assert text.count(protocol.IMAGE_TOKEN) == 1 and text.endswith("###Assistant:")
    assert template.clean_answer(" Glaucoma: absent.###Human: more") == "Glaucoma: absent."
    roundtrip = protocol.ConversationTemplate.from_dict(template.to_dict())
    assert roundtrip == template
