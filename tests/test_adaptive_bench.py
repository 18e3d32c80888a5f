"""benchmarks/adaptive.py: arms defined on the command line (``--arm NAME BASE KEY=VALUE ...``)."""

from __future__ import annotations

import pytest
from helpers import load_benchmark


@pytest.fixture
def adaptive():
    """The benchmark's module, loaded afresh (``define_arms`` adds to its ``ARMS``)."""
    return load_benchmark("adaptive")


def test_an_arm_builds_on_another(adaptive):
    adaptive.define_arms([["mi3-frozen-bn", "mi3", "model.visual.norm=frozen"], ["again", "static"]])
    what, overrides = adaptive.ARMS["mi3-frozen-bn"]
    assert overrides == [*adaptive.ARMS["mi3"][1], "model.visual.norm=frozen"]
    assert what.startswith(adaptive.ARMS["mi3"][0]) and "model.visual.norm=frozen" in what
    assert adaptive.ARMS["again"][1] == adaptive.ARMS["static"][1]


@pytest.mark.parametrize("spec, words", [
    (["alone"], "a name and the arm it builds on"),
    (["x", "nonsense", "model.loss.mi=1"], "no arm 'nonsense'"),
    (["lads", "static"], "exists already"),
])
def test_a_bad_arm_is_named(adaptive, spec, words):
    with pytest.raises(ValueError, match=words):
        adaptive.define_arms([spec])


def test_the_table_marks_an_arm_its_time_cap_stopped(adaptive):
    dynamicity = {"layers_varying": 2, "layers_never": 8, "filters_varying_fraction": 0.17,
                  "filters_never_fraction": 0.001, "flops": {"mean": 0.58, "std": 0.02}}
    rows = [{"what": "LADS", "steps": 547, "stopped": "time budget", "prec@0.5": 80.5, "by_type": {"spatial": 54.8},
             "dynamicity": dynamicity, "flops_by_type": {"spatial": 0.56}},
            {"what": "dense", "steps": 648, "stopped": "finished", "prec@0.5": 81.29, "by_type": {"spatial": 54.8}}]
    lads, dense = adaptive.markdown(rows, "val").splitlines()[2:]
    assert lads.startswith("| LADS | 547 (time cap) | 80.50 | 54.8 | 2 | 8 | 0.17 | 0.001 | 0.58 ± 0.02 | 0.56 |")
    assert dense.startswith("| dense | 648 | 81.29 | 54.8 | – |")
