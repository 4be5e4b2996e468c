import numpy as np
import pytest

from federated import partition as P


def _check_disjoint_cover(shards, n):
    allrows = np.concatenate(shards)
    assert allrows.shape[0] == n
    assert np.unique(allrows).shape[0] == n


def test_parse():
    assert P.PartitionSpec.parse("iid").kind == "iid"
    assert P.PartitionSpec.parse("dirichlet:0.1").alpha == 0.1
    assert P.PartitionSpec.parse("column:native-country").column == "native-country"
    for bad in ("dirichlet:0", "dirichlet:x", "column:", "foo"):
        with pytest.raises(ValueError):
            P.PartitionSpec.parse(bad)


def test_iid_sizes_and_disjoint():
    rng = np.random.default_rng(0)
    shards = P.iid(1003, 10, rng)
    assert len(shards) == 10
    sizes = [s.shape[0] for s in shards]
    assert max(sizes) - min(sizes) <= 1
    _check_disjoint_cover(shards, 1003)
    with pytest.raises(ValueError):
        P.iid(5, 6, rng)


def test_dirichlet_disjoint_nonempty_and_skew_grows_as_alpha_falls():
    rng = np.random.default_rng(0)
    labels = (rng.random(5000) < 0.25).astype(np.float32)
    skews = {}
    for alpha in (100.0, 1.0, 0.1):
        vals = []
        for seed in range(3):
            shards = P.dirichlet(labels, 20, alpha, np.random.default_rng(seed))
            assert len(shards) == 20
            assert all(s.shape[0] >= 1 for s in shards)
            _check_disjoint_cover(shards, 5000)
            vals.append(P.shard_summary(shards, labels)["label_skew"])
        skews[alpha] = np.mean(vals)
    assert skews[100.0] < skews[1.0] < skews[0.1]
    assert skews[100.0] < 0.05


def test_iid_has_little_label_skew():
    rng = np.random.default_rng(1)
    labels = (rng.random(5000) < 0.25).astype(np.float32)
    s = P.shard_summary(P.iid(5000, 10, rng), labels)
    assert s["label_skew"] < 0.03
    assert s["rows"] == 5000 and s["clients"] == 10 and len(s["sizes"]) == 10


def test_column_partition_one_client_per_value_and_name_resolution():
    feats = {"native_country_xf": np.array([0, 2, 2, 5, 0, 5, 5]), "age": np.zeros(7)}
    assert P.find_column(feats, "native-country") == "native_country_xf"
    spec = P.PartitionSpec.parse("column:native-country")
    shards = P.make_shards(spec, feats, np.zeros(7), 99, np.random.default_rng(0))
    assert [s.tolist() for s in shards] == [[0, 4], [1, 2], [3, 5, 6]]
    with pytest.raises(ValueError):
        P.find_column(feats, "sex")


def test_column_partition_on_adult(adult):
    shards = P.make_shards(P.PartitionSpec.parse("column:native-country"), adult.train_features,
                         adult.train_labels, 0, np.random.default_rng(0))
    _check_disjoint_cover(shards, adult.train_labels.shape[0])
    assert len(shards) == len(np.unique(adult.train_features["native-country"]))
    s = P.shard_summary(shards, adult.train_labels)
    assert s["size_max"] > 0.8 * s["rows"]  # United-States dominates: very unbalanced silos
