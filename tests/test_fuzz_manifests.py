"""Fuzzing the manifest loader: whatever a file holds, `load_manifest` returns a job or raises
ManifestError (a list of 'path: problem' lines) — no other exception, and no hang.

Three kinds of input, 600 in all: a valid manifest with a few fields set to hostile values (from
every path the CRD knows), arbitrary YAML documents, and arbitrary text. An accepted manifest must
also survive its own round trip (dumped and loaded again, the same job).
"""

from __future__ import annotations

import contextlib
import math
import signal
import tempfile
from pathlib import Path
from typing import Any, Iterator

import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from asyncrlhf.api import AsyncRLHFJob
from asyncrlhf.manifest import ManifestError, dump_manifest, load_manifest
from asyncrlhf_operator import crd

SECONDS_PER_MANIFEST = 10  # far above the few milliseconds one takes: only a hang trips it
FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _paths(node: dict[str, Any], prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    for name, child in node.get("properties", {}).items():
        yield from _paths(child, prefix + (name,))


SPEC_PATHS = sorted(set(_paths(crd.spec_schema()["properties"]["spec"], ("spec",))))
PATHS = SPEC_PATHS + [("metadata", "name"), ("metadata", "namespace"), ("metadata",), ("apiVersion",), ("kind",)]
BASE = yaml.safe_load((Path(__file__).resolve().parents[1] / "examples" / "local-tiny.yaml").read_text())

NASTY_NUMBERS = st.sampled_from([math.inf, -math.inf, math.nan, 1e-9, 1e30, -1, 0, 2 ** 63, 10 ** 100, -0.0, 1e308])
NASTY_TEXT = st.sampled_from([
    "", " ", ">", "*", "../../etc/shadow", "/etc/shadow", "a" * 70_000, "nats://u:p@evil:4222", "lots", "huge",
    "builtin:nope", "\x00", "ü", "${HOME}", "-1", "1e999", ".inf", "null", "[x", "{}", "\\\\evil\\share",
])
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30) | NASTY_NUMBERS | NASTY_TEXT
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=12) | st.integers(), inner, max_size=4), max_leaves=12)


def _set(doc: dict[str, Any], path: tuple, value: Any) -> None:
    node = doc
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value


@st.composite
def mutated_manifests(draw) -> dict[str, Any]:
    doc = yaml.safe_load(yaml.safe_dump(BASE))  # a fresh deep copy
    for path in draw(st.lists(st.sampled_from(PATHS), min_size=1, max_size=4)):
        _set(doc, path, draw(VALUES))
    return doc


@contextlib.contextmanager
def time_limit(seconds: int):
    def expired(*_):
        raise TimeoutError(f"load_manifest ran past {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def load_text(text: str) -> AsyncRLHFJob | ManifestError:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "job.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        with time_limit(SECONDS_PER_MANIFEST):
            try:
                return load_manifest(path)
            except ManifestError as err:
                return err


def check(outcome: AsyncRLHFJob | ManifestError) -> None:
    event("refused" if isinstance(outcome, ManifestError) else "accepted")
    if isinstance(outcome, ManifestError):
        assert outcome.problems and all(isinstance(p, str) and ": " in p for p in outcome.problems), outcome.problems
        return
    assert isinstance(outcome, AsyncRLHFJob)
    again = load_text(dump_manifest(outcome))
    assert again == outcome, again


@settings(FUZZ, max_examples=300)
@given(mutated_manifests())
def test_hostile_field_values(doc):
    check(load_text(yaml.safe_dump(doc, allow_unicode=True)))


@settings(FUZZ, max_examples=150)
@given(VALUES)
def test_arbitrary_yaml_documents(value):
    check(load_text(yaml.safe_dump(value, allow_unicode=True)))


@settings(FUZZ, max_examples=150)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=400)
       | st.sampled_from(["a: &a [*a]", "x: !!binary '@@'", "d: 2024-13-45", "[" * 5000, "- " * 5000,
                          "a: &a [1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]"
                          "\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
                          "kind: AsyncRLHFJob\nmetadata: {name: bomb, labels: {x: *e}}\nspec: {x: *e}\n"]))
def test_arbitrary_text(text):
    check(load_text(text))

