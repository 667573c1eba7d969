"""Synthetic two-hop reasoning: a random world of people, relations and birthplaces.

Each subject A has, for every relation, one bridge person B ("The mother of A is B.": hop 1), and
every bridge person has a birthplace C ("B was born in C.": hop 2). A two-hop statement joins both
("The mother of A was born in C.") and is true exactly when C is the birthplace of A's mother.
Names are made up from syllables, so no pretrained model knows any of these facts.

The splits, all binary statement verification (label 1 = true, 0 = false, half each):
  hop1            every hop-1 fact, true and with a wrong bridge person   (adapter 1 learns these)
  hop2            every hop-2 fact, true and with a wrong city            (adapter 2 learns these)
  two_hop_train   two-hop statements about one part of the subjects       (for methods that train
  two_hop_dev     two-hop statements about another part                    a composition: LoraMap,
  two_hop         two-hop statements about the rest (the test split)       LoraHub)
two_hop_dev is held out for choosing settings; the recycling study fixes its settings in advance and
reports the test split only, so it does not read it.
Every two-hop statement's two facts are in hop1 and hop2; the three two-hop splits share no subject.
"""
from __future__ import annotations

import random
from typing import TYPE_CHECKING, Dict, List, Sequence

if TYPE_CHECKING:  # hints only: datasets and transformers are imported where used
    from datasets import DatasetDict

ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kl", "tr"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
CODAS = ["", "n", "r", "l", "s", "th", "m"]
LABEL_NAMES = ["false", "true"]
# Distinct two-syllable names (people and the relatives they are linked to draw from them).
TWO_SYLLABLE_NAMES = (len(ONSETS) * len(VOWELS)) ** 2 * len(CODAS)


def _names(rng: random.Random, n: int, syllables: int, taken: set) -> List[str]:
    out = []
    while len(out) < n:
        name = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(syllables)) + rng.choice(CODAS)
        name = name.capitalize()
        if name not in taken:
            taken.add(name)
            out.append(name)
    return out


def max_people(n_relations: int = 2) -> int:
    """The most people a world can have: subjects and their relatives all need distinct names."""
    return TWO_SYLLABLE_NAMES // (1 + n_relations)


def two_hop_world(n_people: int = 32, n_cities: int = 8, relations: Sequence[str] = ("mother", "father"),
                  seed: int = 0) -> dict:
    """The facts themselves: {"subjects", "bridges", "cities", "relation": {(A, rel): B}, "birthplace": {B: C}}."""
    if n_people < 3:
        raise ValueError(f"n_people must be >= 3 (three two-hop splits), got {n_people}")
    if n_cities < 2:
        raise ValueError(f"n_cities must be >= 2 (false statements need another city), got {n_cities}")
    if not relations:
        raise ValueError("relations must name at least one relation")
    most = max_people(len(relations))
    if n_people > most:
        raise ValueError(f"n_people must be <= {most} with {len(relations)} relations: each person and each "
                         f"relative needs a distinct name of two syllables ({TWO_SYLLABLE_NAMES} exist), "
                         f"got {n_people}")
    rng = random.Random(seed)
    taken: set = set()
    subjects = _names(rng, n_people, 2, taken)
    bridges = _names(rng, n_people * len(relations), 2, taken)
    cities = _names(rng, n_cities, 3, taken)
    rng.shuffle(bridges)
    pairs = [(a, rel) for a in subjects for rel in relations]
    relation = {p: b for p, b in zip(pairs, bridges)}
    birthplace = {b: rng.choice(cities) for b in bridges}
    return {"subjects": subjects, "bridges": bridges, "cities": cities, "relations": list(relations),
            "relation": relation, "birthplace": birthplace}


def two_hop_examples(n_people: int = 32, n_cities: int = 8, relations: Sequence[str] = ("mother", "father"),
                     seed: int = 0, split_fractions: Sequence[float] = (0.4, 0.2)) -> Dict[str, List[dict]]:
    """The splits as lists of {"text", "text_pair", "label"} dicts (see the module docstring).

    split_fractions: the shares of subjects whose two-hop statements go to two_hop_train and
    two_hop_dev; the rest make the test split two_hop.
    """
    w = two_hop_world(n_people, n_cities, relations, seed)
    rng = random.Random(seed + 1)
    bridges, cities = w["bridges"], w["cities"]

    def other(pool, wrong):
        choice = rng.choice(pool)
        while choice == wrong:
            choice = rng.choice(pool)
        return choice

    def ex(text, label):
        return {"text": text, "text_pair": "", "label": label}

    hop1, hop2 = [], []
    for (a, rel), b in w["relation"].items():
        hop1 += [ex(f"The {rel} of {a} is {b}.", 1), ex(f"The {rel} of {a} is {other(bridges, b)}.", 0)]
    for b, c in w["birthplace"].items():
        hop2 += [ex(f"{b} was born in {c}.", 1), ex(f"{b} was born in {other(cities, c)}.", 0)]
    subjects = list(w["subjects"])
    rng.shuffle(subjects)
    n_train = max(1, int(round(split_fractions[0] * len(subjects))))
    n_dev = max(1, int(round(split_fractions[1] * len(subjects))))
    if n_train + n_dev >= len(subjects):
        raise ValueError(f"split_fractions {tuple(split_fractions)} leave no subjects for the test split")
    groups = {"two_hop_train": subjects[:n_train], "two_hop_dev": subjects[n_train:n_train + n_dev],
              "two_hop": subjects[n_train + n_dev:]}
    out = {"hop1": hop1, "hop2": hop2}
    for split, subs in groups.items():
        rows = []
        for a in subs:
            for rel in w["relations"]:
                c = w["birthplace"][w["relation"][(a, rel)]]
                rows += [ex(f"The {rel} of {a} was born in {c}.", 1),
                         ex(f"The {rel} of {a} was born in {other(cities, c)}.", 0)]
        out[split] = rows
    for rows in out.values():
        rng.shuffle(rows)
    return out


def two_hop(n_people: int = 32, n_cities: int = 8, relations: Sequence[str] = ("mother", "father"),
            seed: int = 0, split_fractions: Sequence[float] = (0.4, 0.2)) -> DatasetDict:
    """The splits as a datasets.DatasetDict (columns text, text_pair, label: ClassLabel false/true)."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("lorafuse's data loaders need the datasets package: pip install datasets") from e
    features = datasets.Features({"text": datasets.Value("string"), "text_pair": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=LABEL_NAMES)})
    splits = two_hop_examples(n_people, n_cities, relations, seed, split_fractions)
    return datasets.DatasetDict({k: datasets.Dataset.from_list(v, features=features) for k, v in splits.items()})
