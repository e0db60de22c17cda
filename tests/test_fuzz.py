"""Issue 12: nothing the user had is ever lost, no input gets a traceback.

One test per case of the CLI fuzz table (tests/fuzz_cases.py), run in this process over one tiny world built per
module (a 2-layer d_model-64 Llama, two caches, a run, an interrupted run, a store, damaged and foreign files);
each must be *handled*: exit 2 with a message naming the option or file, nothing the user had changed, nothing
half-made left behind (or, for inputs that are fine, exit 0). `benchmarks/fuzz_cli.py` prints the same table.

And a property: every numeric field of every config dataclass, given any int, float (nan, inf, -0.0, huge) or
junk value through `cli.config_from`, either builds or raises a SaekitError that names the field.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing

import pytest
from fuzz_cases import CASES, Case, Snapshot, build_world, classify, mentions, run_case
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saekit import config as config_mod
from saekit.cli import config_from
from saekit.errors import SaekitError

# ----------------------------------------------------------------------------- the CLI table


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = build_world(tmp_path_factory.mktemp("fuzz"))
    yield w
    from fuzz_cases import _make_writable

    _make_writable(w.root)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_cli_case(world, case: Case):
    outcome = run_case(case, world)
    if outcome.verdict == "n/a":
        pytest.skip(outcome.why)
    assert outcome.verdict == "handled", outcome.describe()


def test_case_names_are_unique_and_classes_known():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
    assert {c.cls for c in CASES} <= {"data-loss", "traceback", "silent-or-misleading", "extra"}
    assert all(c.names or c.ok for c in CASES)


def _snap(files: dict[str, bytes], dirs=()) -> Snapshot:
    import hashlib

    return Snapshot(dict(files), {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}, set(dirs))


def test_classifier():
    """The harness's own verdicts, on made-up runs."""
    case = Case("x", "extra", lambda w: [], names=("--tokens", "tokens"))
    a = _snap({"f": b"1"})
    assert classify(case, 2, "saekit: error: --tokens must be ≥ 1", None, a, a, False)[0] == "handled"
    assert classify(case, 2, "saekit: error: something", None, a, a, False)[0] == "vague"
    assert classify(case, 1, "saekit: error: --tokens must be ≥ 1", None, a, a, False)[0] == "vague"
    assert classify(case, 0, "", None, a, a, False)[0] == "silent"
    assert classify(case, None, "", ValueError("x"), a, a, False)[0] == "traceback"
    assert classify(case, 2, "Traceback (most recent call last):\n tokens", None, a, a, False)[0] == "traceback"
    assert classify(case, 2, "tokens", None, a, _snap({"f": b"2"}), False)[0] == "data loss"
    assert classify(case, 2, "tokens", None, a, _snap({}), False)[0] == "data loss"
    assert classify(case, 2, "tokens", None, a, _snap({"f": b"1"}, ["new"]), False)[0] == "vague"
    assert classify(case, 0, "", Exception(), a, a, True)[0] == "silent"
    ok = Case("y", "extra", lambda w: [], ok=True)
    assert classify(ok, 0, "", None, a, _snap({"f": b"1", "g": b""}, ["out"]), False)[0] == "handled"
    assert classify(ok, 2, "error", None, a, a, False)[0] == "vague"
    assert mentions("bad --tokens -5", "--tokens") and not mentions("bad --eval-tokens -5", "tokens")
    assert mentions("k must be ≥ 1", "k") and not mentions("checkpoint", "k")


# ----------------------------------------------------------------------------- every numeric config field

CONFIGS = [config_mod.SaeConfig, config_mod.HarvestConfig, config_mod.TrainConfig, config_mod.EvalConfig,
           config_mod.DistConfig, config_mod.FeatureConfig, config_mod.SteerEvalConfig]


def _numeric(hint) -> bool:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return len(args) == 1 and _numeric(args[0])
    return hint in (int, float)


NUMERIC = [(cls, f.name) for cls in CONFIGS for f in dataclasses.fields(cls)
           if _numeric(typing.get_type_hints(cls)[f.name])]

VALUES = st.one_of(
    st.integers(min_value=-10**6, max_value=10**6),
    st.sampled_from([0, -1, 1, -2**31, 2**31, 2**63, 10**30, -10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 0.0, 0.5, 1e-300, 1e300, -1e300]),
    st.sampled_from(["", " ", "abc", "eight", "1e5x", "nan", "inf", "-inf", "-1", "0", "1.5", " 3 ", "0x10", "1,2",
                     "None", "null", "true", "🙂", "1_000", "--5"]),
    st.text(max_size=6),
    st.sampled_from([True, False, None, [1, 2], [], {"a": 1}]),
)


def names_field(message: str, name: str) -> bool:
    dashed = name.replace("_", "-")
    return any(mentions(message, v) for v in (name, dashed, f"--{dashed}", f"eval_{name}", f"--eval-{dashed}"))


def test_numeric_fields_found():
    assert {cls for cls, _ in NUMERIC} == set(CONFIGS)
    assert (config_mod.TrainConfig, "lr") in NUMERIC and (config_mod.SaeConfig, "k") in NUMERIC


@settings(derandomize=True, max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(target=st.sampled_from(NUMERIC), value=VALUES)
def test_numeric_config_values_build_or_name_the_field(target, value):
    cls, name = target
    try:
        config_from(cls, {name: value})
    except SaekitError as e:
        assert names_field(str(e), name), f"{cls.__name__}({name}={value!r}): the error names no field: {e}"
