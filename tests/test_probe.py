"""The linear probes: scikit-learn estimator API, inner grouped CV on training data only, the torch head."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.metrics import balanced_accuracy_score

import mitobench.methods.probe as probe_mod
from mitobench.methods.probe import LogisticProbe, TorchProbe


def blobs(n=120, d=16, sep=3.0, seed=0, n_groups=12):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    y[:n_groups] = 1  # every group has a positive
    X = rng.normal(size=(n, d))
    X[:, 0] += sep * y
    groups = np.arange(n) % n_groups
    return X.astype(np.float32), y, groups


def test_logistic_probe_is_an_estimator():
    est = LogisticProbe(Cs=(0.01, 0.1), inner_splits=2, max_iter=500, random_state=3)
    params = est.get_params()
    assert params == {"Cs": (0.01, 0.1), "inner_splits": 2, "max_iter": 500, "random_state": 3}
    twin = clone(est)
    assert twin is not est and twin.get_params() == params
    est.set_params(inner_splits=4)
    assert est.inner_splits == 4
    assert clone(TorchProbe(lr=1e-3, patience=2)).get_params()["patience"] == 2


def test_logistic_probe_separable():
    X, y, groups = blobs(sep=8.0)
    est = LogisticProbe().fit(X, y, groups)
    assert balanced_accuracy_score(y, est.predict(X)) > 0.98
    Xt, yt, _ = blobs(sep=8.0, seed=1)
    proba = est.predict_proba(Xt)
    assert proba.shape == (len(Xt), 2)
    np.testing.assert_allclose(proba.sum(1), 1.0)
    assert balanced_accuracy_score(yt, est.predict(Xt)) > 0.95
    assert list(est.classes_) == [0, 1]


def test_inner_cv_picks_C_from_grid_on_training_data_only(monkeypatch):
    X, y, groups = blobs(sep=1.0)
    seen = []
    real = probe_mod.inner_group_splits

    def spy(labels, grp, n_splits, seed):
        seen.append((len(labels), set(grp)))
        splits = real(labels, grp, n_splits, seed)
        for tr, va in splits:  # grouped: no slide on both sides
            assert not set(grp[tr]) & set(grp[va])
        return splits

    monkeypatch.setattr(probe_mod, "inner_group_splits", spy)
    Cs = (1e-4, 1e-2, 1.0)
    train = groups < 9  # the "training folds"; groups 9-11 play the validation fold
    est = LogisticProbe(Cs=Cs, inner_splits=3).fit(X[train], y[train], groups[train])
    assert seen == [(int(train.sum()), set(range(9)))]
    assert est.inner_scores_.shape == (3,)
    assert ((0 <= est.inner_scores_) & (est.inner_scores_ <= 1)).all()
    assert est.C_ in Cs
    assert est.C_ == Cs[int(np.argmax(est.inner_scores_))]
    assert est.model_.C == est.C_
    # the validation rows never influence the choice: changing them changes nothing
    est2 = LogisticProbe(Cs=Cs, inner_splits=3).fit(X[train], y[train], groups[train])
    np.testing.assert_array_equal(est.inner_scores_, est2.inner_scores_)


def test_inner_scores_match_a_plain_grid_search():
    """The warm-started path gives the scores of scikit-learn's grid search over a scaler + logistic
    Pipeline: the scaler is refitted on each inner training split, so inner validation rows stay unseen."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from mitobench.splits import inner_group_splits

    X, y, groups = blobs(sep=1.2, seed=4)
    X = X * np.linspace(0.5, 20, X.shape[1]) + 3.0  # unequal scales, so where the scaler is fitted matters
    Cs = (1e-3, 1e-2, 1e-1)
    est = LogisticProbe(Cs=Cs, inner_splits=3).fit(X, y, groups)
    search = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000)),
                          {"logisticregression__C": list(Cs)}, scoring="balanced_accuracy",
                          cv=list(inner_group_splits(y, groups, 3, 42))).fit(X, y)
    np.testing.assert_allclose(est.inner_scores_, search.cv_results_["mean_test_score"], atol=0.02)
    assert est.C_ == search.best_params_["logisticregression__C"]
    # the final model is standardised on all training rows
    np.testing.assert_allclose(est.scaler_.mean_, X.mean(axis=0))


def test_no_groups_uses_first_C():
    X, y, _ = blobs()
    est = LogisticProbe(Cs=(0.5, 1.0)).fit(X, y)
    assert est.C_ == 0.5 and not hasattr(est, "inner_scores_")


def test_balanced_class_weights():
    X, y, groups = blobs(sep=0.5, seed=2)
    est = LogisticProbe(Cs=(0.1,)).fit(X, y, groups)
    assert est.model_.class_weight == "balanced"
    # balanced weights: the minority class is predicted about as often as it occurs, not never
    assert 0.15 < est.predict(X).mean() < 0.7


def test_torch_probe_early_stops_and_returns_probabilities():
    X, y, _ = blobs(n=200, sep=4.0, seed=0)
    Xv, yv, _ = blobs(n=80, sep=4.0, seed=1)
    est = TorchProbe(lr=1e-2, batch_size=16, max_epochs=200, patience=3, standardise=True, random_state=0)
    est.fit(X, y, Xv, yv)
    p = est.predict_proba(Xv)
    assert p.shape == (80, 2)
    assert ((p >= 0) & (p <= 1)).all()
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-6)
    assert est.best_val_ba_ > 0.9
    assert balanced_accuracy_score(yv, est.predict(Xv)) == pytest.approx(est.best_val_ba_)


def test_torch_probe_stops_after_patience(monkeypatch):
    """Early stopping on the validation fold: with patience 2 the loop ends long before max_epochs."""
    import mitobench.methods.probe as mod

    X, y, _ = blobs(n=60, sep=6.0)
    Xv, yv, _ = blobs(n=40, sep=6.0, seed=3)
    evaluations = []
    real = mod.balanced_accuracy_score

    def counting(*a, **k):
        evaluations.append(1)
        return real(*a, **k)

    monkeypatch.setattr(mod, "balanced_accuracy_score", counting)
    TorchProbe(lr=1e-2, batch_size=8, max_epochs=500, patience=2, standardise=True).fit(X, y, Xv, yv)
    assert 3 <= len(evaluations) < 100


def test_torch_probe_seeded():
    X, y, _ = blobs(n=80)
    a = TorchProbe(lr=1e-3, max_epochs=3, random_state=5).fit(X, y).predict_proba(X)
    b = TorchProbe(lr=1e-3, max_epochs=3, random_state=5).fit(X, y).predict_proba(X)
    np.testing.assert_array_equal(a, b)


def test_torch_probe_halves_its_lr_on_a_validation_plateau(monkeypatch):
    """The reference head's ReduceLROnPlateau(max validation BA, factor 0.5, patience 3): a BA that never improves
    after the first epoch halves the lr after every 4th epoch."""
    import mitobench.methods.probe as mod

    X, y, _ = blobs(n=60)
    Xv, yv, _ = blobs(n=40, seed=3)
    monkeypatch.setattr(mod, "balanced_accuracy_score", lambda *a, **k: 0.7)  # a flat validation curve
    est = TorchProbe(lr=1e-3, max_epochs=10, patience=50).fit(X, y, Xv, yv)
    assert est.lr_history_ == [1e-3] * 5 + [5e-4] * 4 + [2.5e-4]
