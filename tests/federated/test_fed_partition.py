"""Partitioners: row-stable ones (a row's client depends only on that row and the public seed) and the
permutation ones (non-private runs only)."""
import numpy as np
import pytest

from federated import partition as P


def _check_disjoint_cover(shards, n):
    allrows = np.concatenate(shards)
    assert allrows.shape[0] == n
    assert np.unique(allrows).shape[0] == n


def _content(features, labels, idx):
    """A shard as a multiset of row contents (row indices shift when a row is removed)."""
    keys = sorted(features)
    return sorted(tuple([float(features[k][i, 0]) for k in keys] + [float(labels[i])]) for i in idx)


def test_parse():
    assert P.PartitionSpec.parse("iid").kind == "iid"
    assert P.PartitionSpec.parse("hash").row_stable
    assert P.PartitionSpec.parse("dirichlet:0.1").alpha == 0.1
    assert not P.PartitionSpec.parse("dirichlet:0.1").row_stable
    s = P.PartitionSpec.parse("hash-dirichlet:0.5")
    assert s.kind == "hash-dirichlet" and s.alpha == 0.5 and s.row_stable and str(s) == "hash-dirichlet:0.5"
    c = P.PartitionSpec.parse("column:native-country")
    assert c.column == "native-country" and c.groups_by == "native-country" and c.row_stable
    h = P.PartitionSpec.parse("hash:native-country")
    assert h.kind == "hash-column" and h.groups_by == "native-country" and str(h) == "hash:native-country"
    assert P.PartitionSpec.parse("").kind == "hash"   # the default is row-stable
    for bad in ("dirichlet:0", "dirichlet:x", "hash-dirichlet:-1", "column:", "hash:", "foo"):
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


def test_permutation_partitions_are_not_row_stable(adult):
    x = {k: v[:600] for k, v in adult.train_features.items()}
    y = adult.train_labels[:600]
    a = P.make_shards(P.PartitionSpec.parse("iid"), x, y, 10, seed=0)
    b = P.make_shards(P.PartitionSpec.parse("iid"), {k: v[1:] for k, v in x.items()}, y[1:], 10, seed=0)
    changed = sum(_content(x, y, s) != _content({k: v[1:] for k, v in x.items()}, y[1:], t) for s, t in zip(a, b))
    assert changed > 1   # why they are refused for private runs on a row-unit source


@pytest.mark.parametrize("partition", ["hash", "hash-dirichlet:0.3", "column:native-country", "hash:education"])
def test_row_stable_removing_one_row_changes_exactly_one_client(adult, partition):
    n = 3000
    x = {k: v[:n] for k, v in adult.train_features.items()}
    y = adult.train_labels[:n]
    spec = P.PartitionSpec.parse(partition)
    clients = (len(adult.spec.public_domains()["native-country"].values) + 1 if spec.kind == "column"
               else 20)   # native-country: its public values + out-of-domain
    full = P.make_shards(spec, x, y, clients, seed=3)
    assert len(full) == clients
    _check_disjoint_cover([s for s in full if s.size], n)
    for removed in (0, 1234, n - 1):
        keep = np.delete(np.arange(n), removed)
        xr, yr = {k: v[keep] for k, v in x.items()}, y[keep]
        less = P.make_shards(spec, xr, yr, clients, seed=3)
        diff = [c for c in range(clients) if _content(x, y, full[c]) != _content(xr, yr, less[c])]
        owner = [c for c in range(clients) if removed in full[c]]
        assert diff == owner and len(diff) == 1, (partition, removed, diff, owner)
        c = diff[0]
        assert len(less[c]) == len(full[c]) - 1


def test_hash_partition_depends_on_the_public_seed_only(adult):
    x = {k: v[:500] for k, v in adult.train_features.items()}
    y = adult.train_labels[:500]
    a = P.make_shards(P.PartitionSpec.parse("hash"), x, y, 7, seed=1)
    b = P.make_shards(P.PartitionSpec.parse("hash"), x, y, 7, seed=1)
    c = P.make_shards(P.PartitionSpec.parse("hash"), x, y, 7, seed=2)
    assert all(np.array_equal(s, t) for s, t in zip(a, b))
    assert not all(np.array_equal(s, t) for s, t in zip(a, c))
    sizes = [s.size for s in a]
    assert min(sizes) > 30   # about 500/7 each (multinomial)


def test_hash_dirichlet_skew_grows_as_alpha_falls(adult):
    x = {k: v[:4000] for k, v in adult.train_features.items()}
    y = adult.train_labels[:4000]
    skews = {}
    for alpha in (100.0, 1.0, 0.05):
        vals = [P.shard_summary(P.make_shards(P.PartitionSpec.parse(f"hash-dirichlet:{alpha}"), x, y, 20, seed),
                                y)["label_skew"] for seed in range(3)]
        skews[alpha] = np.mean(vals)
    assert skews[100.0] < skews[1.0] < skews[0.05]
    assert skews[100.0] < 0.05


def test_permutation_dirichlet_disjoint_nonempty():
    rng = np.random.default_rng(0)
    labels = (rng.random(5000) < 0.25).astype(np.float32)
    shards = P.dirichlet(labels, 20, 0.1, np.random.default_rng(1))
    assert len(shards) == 20 and all(s.shape[0] >= 1 for s in shards)
    _check_disjoint_cover(shards, 5000)


def test_column_partition_one_client_per_public_value(adult):
    from core.features import categorical_key

    key = categorical_key("native-country")
    domain = adult.spec.public_domains()["native-country"].values
    shards = P.make_shards(P.PartitionSpec.parse("column:native-country"), adult.train_features,
                           adult.train_labels, len(domain) + 1, seed=0)
    _check_disjoint_cover(shards, adult.train_labels.shape[0])
    us = domain.index("United-States")
    assert np.all(adult.train_features[key][shards[us], 0] == us)
    assert shards[us].size > 0.8 * adult.train_labels.shape[0]   # very unbalanced silos
    with pytest.raises(ValueError, match="public domain"):
        P.make_shards(P.PartitionSpec.parse("column:native-country"), adult.train_features, adult.train_labels,
                      10, seed=0)
    with pytest.raises(ValueError, match="hash:age"):
        P.make_shards(P.PartitionSpec.parse("column:age"), adult.train_features, adult.train_labels, 10, seed=0)
    s = P.shard_summary(shards, adult.train_labels)
    assert s["clients"] == len(domain) + 1 and s["rows"] == adult.train_labels.shape[0]
