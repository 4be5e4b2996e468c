"""not_covered names the blessing/push decision when it depends on private eval rows (review F8)."""
from core.dataset import load_dataset
from dp_training.protocol import not_covered
from tests.conftest import make_adult_sample


def _blessing_items(directory, public_splits):
    spec = load_dataset(make_adult_sample(directory, 20, 10, privacy={"public_splits": public_splits}))
    return [item for item in not_covered(spec) if "push" in item and "blessing" in item]


def test_a_private_eval_split_makes_the_blessing_not_covered(tmp_path):
    (item,) = _blessing_items(str(tmp_path / "private_eval"), [])
    assert "PRIVATE eval" in item and "NOT covered" in item


def test_a_public_eval_split_adds_no_blessing_item(tmp_path):
    assert _blessing_items(str(tmp_path / "public_eval"), ["eval"]) == []
