"""The training-content fingerprint hashes what the model trains on (review F7): the same training inputs
written differently (a number's spelling, the column order of dataset.json) give the same digest; a changed
input gives another."""
from __future__ import annotations

import json
import os

from core.dataset import load_dataset
from dp_training.fingerprint import content_digest
from tests.conftest import make_adult_sample

AGE = 0


def _sample(directory, mutate=None):
    return make_adult_sample(directory, train_rows=60, eval_rows=20, source_id="fp-sample", mutate=mutate)


def _spell_age(spelling):
    def mutate(split, i, fields):
        fields[AGE] = spelling(float(fields[AGE]))
        return fields
    return mutate


def test_number_spellings_give_the_same_digest(tmp_path):
    plain = content_digest(load_dataset(_sample(str(tmp_path / "plain"))))
    for name, spelling in (("decimal", lambda v: f"{v:.1f}"), ("exponent", lambda v: f"+{v / 10:.6g}e1")):
        other = content_digest(load_dataset(_sample(str(tmp_path / name), _spell_age(spelling))))
        assert other == plain, name
    changed = content_digest(load_dataset(_sample(str(tmp_path / "older"), _spell_age(lambda v: str(int(v) + 1)))))
    assert changed != plain


def test_column_order_of_the_description_gives_the_same_digest(tmp_path):
    plain_dir = _sample(str(tmp_path / "plain"))
    plain = content_digest(load_dataset(plain_dir))
    turned = _sample(str(tmp_path / "turned"), lambda split, i, fields: fields[::-1])
    path = os.path.join(turned, "dataset.json")
    with open(path) as f:
        desc = json.load(f)
    desc["columns"] = desc["columns"][::-1]
    with open(path, "w") as f:
        json.dump(desc, f)
    assert content_digest(load_dataset(turned)) == plain
