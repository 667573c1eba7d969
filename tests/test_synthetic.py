"""The two-hop generator: determinism, label balance, and that every split holds what it should."""
import re

import pytest

# The training path's packages come with the test extra; a bare install (the GPU machine) skips.
for _mod in ("datasets", "sklearn", "accelerate"):
    pytest.importorskip(_mod)

from lorafuse.synthetic import two_hop_examples, two_hop_world  # noqa: E402

HOP1 = re.compile(r"^The (\w+) of (\w+) is (\w+)\.$")
HOP2 = re.compile(r"^(\w+) was born in (\w+)\.$")
TWO = re.compile(r"^The (\w+) of (\w+) was born in (\w+)\.$")


def test_deterministic_and_seed_dependent():
    assert two_hop_examples(seed=3) == two_hop_examples(seed=3)
    assert two_hop_examples(seed=3) != two_hop_examples(seed=4)


@pytest.mark.parametrize("n_people,relations", [(12, ("mother",)), (32, ("mother", "father"))])
def test_splits_are_balanced_disjoint_and_complete(n_people, relations):
    ex = two_hop_examples(n_people=n_people, n_cities=5, relations=relations, seed=1)
    w = two_hop_world(n_people=n_people, n_cities=5, relations=relations, seed=1)
    for split, rows in ex.items():
        assert sum(r["label"] for r in rows) * 2 == len(rows), split
    hop1_true = {HOP1.match(r["text"]).groups() for r in ex["hop1"] if r["label"] == 1}
    hop2_true = {HOP2.match(r["text"]).groups() for r in ex["hop2"] if r["label"] == 1}
    # The hop splits hold exactly the world's facts, each once as true.
    assert hop1_true == {(rel, a, b) for (a, rel), b in w["relation"].items()}
    assert hop2_true == set(w["birthplace"].items())
    # False statements contradict the world.
    for r in ex["hop1"]:
        rel, a, b = HOP1.match(r["text"]).groups()
        assert (w["relation"][(a, rel)] == b) == bool(r["label"])
    subjects = {}
    for split in ("two_hop_train", "two_hop_dev", "two_hop"):
        subjects[split] = set()
        for r in ex[split]:
            rel, a, c = TWO.match(r["text"]).groups()
            b = w["relation"][(a, rel)]
            # Both facts behind every two-hop statement are in hop1 / hop2 as true facts.
            assert (rel, a, b) in hop1_true and (b, w["birthplace"][b]) in hop2_true
            assert (w["birthplace"][b] == c) == bool(r["label"])
            subjects[split].add(a)
    assert not subjects["two_hop"] & (subjects["two_hop_train"] | subjects["two_hop_dev"])
    assert not subjects["two_hop_train"] & subjects["two_hop_dev"]
    assert subjects["two_hop"] and subjects["two_hop_train"] and subjects["two_hop_dev"]
    # No two-hop statement reads like a single-hop fact.
    assert not {r["text"] for r in ex["two_hop"]} & {r["text"] for r in ex["hop1"] + ex["hop2"]}


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_people"):
        two_hop_examples(n_people=2)
    with pytest.raises(ValueError, match="n_cities"):
        two_hop_examples(n_cities=1)
    with pytest.raises(ValueError, match="split_fractions"):
        two_hop_examples(n_people=4, split_fractions=(0.5, 0.5))


def test_dataset_dict_has_class_labels():
    from lorafuse.synthetic import two_hop

    d = two_hop(n_people=6, seed=0)
    assert set(d) == {"hop1", "hop2", "two_hop_train", "two_hop_dev", "two_hop"}
    assert d["hop1"].features["label"].names == ["false", "true"]


def test_more_people_than_names_is_refused():
    """Past max_people() the world would run out of distinct names (and its drawing loop never end)."""
    from lorafuse.synthetic import max_people, two_hop_world

    with pytest.raises(ValueError, match=f"n_people must be <= {max_people()}"):
        two_hop_world(n_people=max_people() + 1)
