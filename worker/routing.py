"""Routing rules (issue 15 item 1): which received instances are analysed, where their originals go, and how
urgent their study is.

``[[rules]]`` (``worker.config.Rule``) are tried in order for every received instance; the first rule whose
every given test passes decides. A rule tests the association (calling AE title, called AE title, peer host)
and the instance (Modality, SOP Class UID, any attribute by DICOM keyword, read from the stored file's header
only when a rule asks for one) with ``equals``, ``glob``, ``regex`` (full match) or ``present``. With no rule
matching, :data:`DEFAULT` decides: analyse, forward nowhere, normal priority, which is the behaviour without
rules.

Per instance the decision sets whether it is analysed (``analyse = false`` files it as not analysed, with the
rule named as the reason; ``analyse = true`` never makes a non-photograph analysable). Per completed study the
decisions of its instances are combined (:func:`study_route`): the union of their forward destinations and the
highest priority. The ingest service records both; :mod:`worker.pipeline` acts on them.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.config import Priority, Rule, ValueMatch

DEFAULT_RULE = "default"


@dataclass(frozen=True, slots=True)
class RouteInput:
    """What a rule can test: the association and the instance. ``attribute(keyword)`` reads any attribute of
    the instance's header (None when absent); it is called only when a rule tests attributes."""

    calling_ae: str
    called_ae: str
    peer_host: str | None
    modality: str | None
    sop_class_uid: str
    attribute: Callable[[str], str | None] = field(default=lambda keyword: None)


@dataclass(frozen=True, slots=True)
class Decision:
    """The deciding rule (``default`` when none matched), what it decided, and why it matched."""

    rule: str
    analyse: bool
    forward: tuple[str, ...]
    priority: Priority
    reasons: tuple[str, ...]


DEFAULT = Decision(DEFAULT_RULE, True, (), Priority.NORMAL, ("no rule matched: the default analyses the instance",))


@dataclass(frozen=True, slots=True)
class Evaluation:
    """One rule tried against one input: whether it matched, and each test's verdict."""

    rule: str
    matched: bool
    checks: tuple[str, ...]


def _describe(match: str | ValueMatch) -> tuple[str, str]:
    if isinstance(match, str):
        return "glob", match
    for operator in ("equals", "glob", "regex"):
        value = getattr(match, operator)
        if value is not None:
            return operator, value
    return "present", str(match.present).lower()


def passes(match: str | ValueMatch, value: str | None) -> bool:
    """Whether ``value`` passes ``match`` (a plain string is a glob)."""
    operator, expected = _describe(match)
    if operator == "present":
        return (value is not None and value.strip() != "") == (expected == "true")
    if value is None:
        return False
    if operator == "equals":
        return value == expected
    if operator == "glob":
        return fnmatch.fnmatchcase(value, expected)
    return re.fullmatch(expected, value) is not None


_FIELDS = (("calling_ae", "calling AE title"), ("called_ae", "called AE title"), ("peer_host", "peer host"),
           ("modality", "Modality"), ("sop_class_uid", "SOP Class UID"))


def evaluate(rule: Rule, given: RouteInput) -> Evaluation:
    """Try one rule; stops at the first failing test (attributes are read only when the earlier tests pass)."""
    checks: list[str] = []
    tests: list[tuple[str, str | ValueMatch, Callable[[], str | None]]] = []
    for name, label in _FIELDS:
        match = getattr(rule, name)
        if match is not None:
            tests.append((label, match, lambda name=name: getattr(given, name)))
    for keyword, match in rule.attributes.items():
        tests.append((keyword, match, lambda keyword=keyword: given.attribute(keyword)))
    for label, match, read in tests:
        value = read()
        operator, expected = _describe(match)
        passed = passes(match, value)
        shown = "absent" if value is None else repr(value)
        checks.append(f"{label} {shown} {'matches' if passed else 'does not match'} {operator} {expected!r}")
        if not passed:
            return Evaluation(rule.name, False, tuple(checks))
    if not tests:
        checks.append("no tests: matches everything")
    return Evaluation(rule.name, True, tuple(checks))


def route(rules: Iterable[Rule], given: RouteInput) -> tuple[Decision, list[Evaluation]]:
    """The first matching rule's decision (or :data:`DEFAULT`) and the evaluations that led to it."""
    tried: list[Evaluation] = []
    for rule in rules:
        evaluation = evaluate(rule, given)
        tried.append(evaluation)
        if evaluation.matched:
            return Decision(rule.name, rule.analyse, tuple(rule.forward), rule.priority, evaluation.checks), tried
    return DEFAULT, tried


def study_route(decisions: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Combine the recorded per-instance decisions of a study: the rules that decided, the union of their
    forward destinations (in first-seen order) and the highest priority."""
    rules: list[str] = []
    forward: list[str] = []
    urgent = False
    for decision in decisions:
        if not decision:  # our own result objects are not routed (their route may read back as JSON null)
            continue
        if decision["rule"] not in rules:
            rules.append(decision["rule"])
        forward += [name for name in decision.get("forward", ()) if name not in forward]
        urgent |= decision.get("priority") == Priority.URGENT.value
    return {"rules": rules, "forward": forward,
            "priority": (Priority.URGENT if urgent else Priority.NORMAL).value}


def header_reader(path: Path) -> Callable[[str], str | None]:
    """``attribute(keyword)`` for a stored file, reading its header (no pixel data) once, on first use."""
    cache: dict[str, Any] = {}

    def attribute(keyword: str) -> str | None:
        if "ds" not in cache:
            import pydicom

            cache["ds"] = pydicom.dcmread(path, stop_before_pixels=True)
        return attribute_text(cache["ds"], keyword)

    return attribute


def attribute_text(ds: Any, keyword: str) -> str | None:
    """The value of an attribute as rules see it: text, multiple values joined with ``\\``; None when absent
    or empty; a sequence is ``present`` with its item count as text."""
    element = ds.data_element(keyword) if keyword in ds else None
    if element is None or element.value is None or element.value == "":
        return None
    value = element.value
    if element.VR == "SQ":
        return str(len(value)) if len(value) else None
    if isinstance(value, bytes | bytearray):
        return f"<{len(value)} bytes>"
    if not isinstance(value, str) and hasattr(value, "__iter__"):
        return "\\".join(str(v) for v in value)
    return str(value)
