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
