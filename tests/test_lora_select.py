"""The pure logic of adapter choice (themis_pg/pl/adapters.py): argument checks and the
softmax over centroid similarities."""

from __future__ import annotations

import pytest

from themis_pg.pl.adapters import choose, softmax_choice
from themis_pg.pl.errors import PLError


def test_softmax_keeps_only_what_reaches_the_threshold_and_at_most_n():
    sims = {"medical": 0.62, "legal": 0.05, "cooking": 0.04}
    assert softmax_choice(sims, 0.3, 0.05, 2) == {"medical": pytest.approx(1.0)}
    assert softmax_choice({"a": 0.1, "b": -0.2}, 0.3, 0.05, 2) == {}, "unrelated: none"
    two = softmax_choice({"a": 0.50, "b": 0.45, "c": 0.40}, 0.3, 0.05, 2)
    assert list(two) == ["a", "b"]
    assert two["a"] > two["b"] > 0 and sum(two.values()) < 1.0  # shares over all three
    hot = softmax_choice({"a": 0.50, "b": 0.45}, 0.3, 10.0, 2)
    assert hot["a"] == pytest.approx(hot["b"], rel=0.01), "a high temperature evens them out"


@pytest.mark.parametrize("args, message", [
    ((["a"], None, True, None), "one of"),
    ((None, None, True, ["legal"]), "one of"),
    ((["a", "a"], None, False, None), "distinct"),
    ((["a", None], None, False, None), "NULL"),
    ((["a"], [0.5, 0.5], False, None), "2 values for 1 adapters"),
    ((None, [1.0], False, None), "needs adapters or domains"),
    ((None, [1.0], True, None), "needs adapters or domains"),
    ((["a"], [17.0], False, None), "between 0 and 16"),
    ((None, [0.5], False, ["legal", "medical"]), "1 values for 2 domains"),
])
def test_bad_adapter_arguments(args, message):
    with pytest.raises(PLError) as err:
        choose(*args)
    assert message in err.value.message and err.value.sqlstate == "22023"


def test_good_adapter_arguments():
    c = choose(["a", "b"], [0.6, 0.4], None, None)
    assert (c.names, c.weights, c.auto, c.domains) == (["a", "b"], [0.6, 0.4], False, [])
    d = choose(None, None, True, None)
    assert d.auto and not d.names
    f = choose(None, [0.7, 0.3], False, ["legal", "medical"])
    assert f.domains == ["legal", "medical"] and f.weights == [0.7, 0.3]
