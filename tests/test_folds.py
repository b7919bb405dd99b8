"""The paper's folds and split counts, on the real data (skipped without it) and on the fixture."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import sklearn

from fixtures import make_amibr
from mitobench.data.records import discover, evaluation_sets, load_amibr
from mitobench.errors import MitobenchError
from mitobench.splits import SKLEARN_VERSION, inner_group_splits, paper_folds


@pytest.fixture(scope="module")
def real_sets(real_data):
    return evaluation_sets(discover(real_data))


def test_sklearn_pinned():
    assert sklearn.__version__ == SKLEARN_VERSION == "1.9.1"


def test_real_counts(real_sets, real_data, shared_docs):
    assert len(real_sets["AMi-Br-train"]) + len(real_sets["AMi-Br-test"]) == 3720
    assert len(real_sets["AMi-Br-train"]) == 2894
    assert int(real_sets["AMi-Br-train"]["label"].sum()) == 648
    assert len(real_sets["AMi-Br-test"]) == 826
    assert int(real_sets["AMi-Br-test"]["label"].sum()) == 184
    assert len(real_sets["AtNorM-Br"]) == 746
    assert int(real_sets["AtNorM-Br"]["label"].sum()) == 128
    # the derived test split is exactly the published one
    expected = pd.read_csv(shared_docs / "amibr_test_split.csv")
    test = real_sets["AMi-Br-test"].set_index("image")
    assert set(test.index) == set(expected["dataset_uid"])
    exp = expected.set_index("dataset_uid")
    assert (test.loc[exp.index, "label"].to_numpy() == (exp["final_label"] == "Atypical").astype(int).to_numpy()).all()
    assert (test.loc[exp.index, "group"].to_numpy() == exp["slide"].to_numpy()).all()


def test_real_train_test_slide_disjoint(real_sets):
    train_slides = set(real_sets["AMi-Br-train"]["group"])
    test_slides = set(real_sets["AMi-Br-test"]["group"])
    assert len(train_slides) == 146 and len(test_slides) == 56
    assert not train_slides & test_slides
    assert not real_sets["AMi-Br-test"]["group"].isna().any()


def test_real_train_keeps_csv_order(real_sets, real_data):
    csv = pd.read_csv(real_data / "amibr_train_split.csv")
    assert real_sets["AMi-Br-train"]["image"].tolist() == csv["dataset_uid"].tolist()


def test_paper_folds_on_real_data(real_sets, shared_docs):
    train = real_sets["AMi-Br-train"]
    folds = paper_folds(train)
    assert sorted(set(folds)) == [1, 2, 3, 4, 5]
    sizes = [int((folds == k).sum()) for k in range(1, 6)]
    atypical = [int(train["label"].to_numpy()[folds == k].sum()) for k in range(1, 6)]
    assert sizes == [563, 564, 632, 571, 564]
    assert atypical == [120, 122, 160, 125, 121]
    # row by row equal to the reference folds computed with scikit-learn 1.9.1
    reference = pd.read_csv(shared_docs / "paper_folds_sklearn191.csv")
    assert reference["dataset_uid"].tolist() == train["image"].tolist()
    assert (reference["fold"].to_numpy() == folds).all()
    # slides never straddle folds
    per_slide = pd.Series(folds).groupby(train["group"].to_numpy()).nunique()
    assert (per_slide == 1).all()


def test_paper_folds_fixture_grouped_and_deterministic(tmp_path):
    fx = make_amibr(tmp_path)
    train = load_amibr(tmp_path).query("split == 'train'").reset_index(drop=True)
    folds = paper_folds(train)
    assert len(folds) == fx.n_train and sorted(set(folds)) == [1, 2, 3, 4, 5]
    assert (pd.Series(folds).groupby(train["group"]).nunique() == 1).all()
    for k in range(1, 6):  # the fixture puts positives on every slide: every fold has both classes
        assert 0 < train["label"].to_numpy()[folds == k].sum() < (folds == k).sum()
    assert (paper_folds(train) == folds).all()


def test_paper_folds_need_groups(tmp_path):
    make_amibr(tmp_path)
    train = load_amibr(tmp_path).query("split == 'train'").reset_index(drop=True)
    train.loc[0, "group"] = np.nan
    with pytest.raises(MitobenchError, match="slide"):
        paper_folds(train)


def test_inner_group_splits_are_grouped():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(12), 5)
    labels = (rng.random(60) < 0.3).astype(int)
    labels[::5] = 1
    splits = inner_group_splits(labels, groups, 3)
    assert len(splits) == 3
    for tr, va in splits:
        assert not set(groups[tr]) & set(groups[va])
        assert len(tr) + len(va) == 60
