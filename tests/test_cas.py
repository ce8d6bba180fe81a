"""CAS and the real / synthetic / real + synthetic protocol, against scikit-learn on the real digits splits."""
import numpy as np
import pytest
import torch

from fastcm.data import load_digits
from fastcm.eval.cas import cas_protocol, classification_accuracy
from fastcm.fid.digits_net import train_classifier


@pytest.fixture(scope="module")
def splits():
    tr, te = load_digits("train"), load_digits("test")
    return (*tr.get_batch(torch.arange(len(tr))), *te.get_batch(torch.arange(len(te))))


def test_logreg_judge_matches_sklearn(splits):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import recall_score

    xtr, ytr, xte, yte = splits
    res = classification_accuracy(xtr, ytr, xte, yte, judge="logreg")
    a, b = xtr.flatten(1).double().numpy(), xte.flatten(1).double().numpy()  # the judge fits in float64
    clf = LogisticRegression(max_iter=5000).fit(a, ytr.numpy())
    assert res["accuracy"] == pytest.approx(clf.score(b, yte.numpy()), abs=1e-12)
    pred = clf.predict(b)
    assert res["per_class"] == pytest.approx(list(recall_score(yte.numpy(), pred, average=None)), abs=1e-12)
    # the real-data baseline the demo compares CAS with (0.976: this logistic judge trained on the real train split, measured here)
    assert 0.95 <= res["accuracy"] <= 0.995


def test_cas_of_samples_with_wrong_labels_is_chance(splits):
    xtr, ytr, xte, yte = splits
    g = torch.Generator().manual_seed(0)
    shuffled = ytr[torch.randperm(len(ytr), generator=g)]  # images no longer match their classes
    acc = classification_accuracy(xtr, shuffled, xte, yte, judge="logreg")["accuracy"]
    assert acc < 0.25


def test_cnn_judge_learns_digits_and_is_seeded(splits):
    xtr, ytr, xte, yte = splits
    a = classification_accuracy(xtr, ytr, xte, yte, judge="cnn", seed=1, cnn_epochs=4)
    b = classification_accuracy(xtr, ytr, xte, yte, judge="cnn", seed=1, cnn_epochs=4)
    assert a == b and a["accuracy"] >= 0.93
    n1 = train_classifier(xtr[:200], ytr[:200], epochs=1, seed=1)
    n2 = train_classifier(xtr[:200], ytr[:200], epochs=1, seed=2)
    assert not torch.equal(n1.conv1.weight, n2.conv1.weight)
    # steps = epochs x batches per epoch is the same training; the protocol uses steps to match compute across arms
    a, b = (train_classifier(xtr[:130], ytr[:130], seed=4, **kw) for kw in (dict(epochs=2), dict(steps=6)))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    state = torch.random.get_rng_state()
    train_classifier(xtr[:100], ytr[:100], epochs=1, seed=3)
    assert torch.equal(state, torch.random.get_rng_state()), "the caller's global RNG must be left untouched"


def test_protocol_arms_and_verdict(splits):
    xtr, ytr, xte, yte = splits
    # "synthetic" = a noisy copy of the real train split: its arm must be measurable and the union is twice as big
    g = torch.Generator().manual_seed(0)
    xs = (xtr + 0.5 * torch.randn(xtr.shape, generator=g)).clamp(-1, 1)
    res = cas_protocol(xtr, ytr, xs, ytr, xte, yte, judge="logreg", seeds=[0, 1])
    real = classification_accuracy(xtr, ytr, xte, yte, judge="logreg")["accuracy"]
    syn = classification_accuracy(xs, ytr, xte, yte, judge="logreg")["accuracy"]
    assert res["real"]["values"] == [real, real] and res["real"]["std"] == 0.0  # L-BFGS: deterministic
    assert res["synthetic"]["mean"] == pytest.approx(syn)
    assert res["real+synthetic"]["train_size"] == 2 * len(xtr)
    gain = res["real+synthetic"]["mean"] - res["real"]["mean"]
    assert res["real_plus_synthetic_minus_real"] == pytest.approx(gain)
    assert res["real_plus_synthetic_beats_real"] == (gain > 0)  # std 0: any gain counts


def test_one_seed_makes_no_claim(splits):
    # One seed has no spread: "real + synthetic beats real" can be neither claimed nor denied.
    xtr, ytr, xte, yte = splits
    res = cas_protocol(xtr, ytr, xtr, ytr, xte, yte, judge="logreg", seeds=[0])
    assert res["real_plus_synthetic_beats_real"] is None and "no claim can be made" in res["verdict"]
    two = cas_protocol(xtr, ytr, xtr, ytr, xte, yte, judge="logreg", seeds=[0, 1])
    assert isinstance(two["real_plus_synthetic_beats_real"], bool) and two["verdict"].startswith(("yes", "no"))


def test_protocol_needs_a_gain_beyond_the_seed_noise(splits):
    xtr, ytr, xte, yte = splits
    # synthetic = the real images again: no information added, so no "win" may be claimed from seed noise alone
    res = cas_protocol(xtr[:300], ytr[:300], xtr[:300], ytr[:300], xte, yte, judge="cnn", seeds=[0, 1, 2],
                       cnn_epochs=2)
    assert res["cnn_steps_per_arm"] == 2 * 3  # 2 passes over 300 real images at batch 128, for every arm
    se = np.sqrt((res["real"]["std"] ** 2 + res["real+synthetic"]["std"] ** 2) / 3)
    assert res["real_plus_synthetic_beats_real"] == (res["real_plus_synthetic_minus_real"] > se)
    assert res["real"]["std"] == pytest.approx(np.std(res["real"]["values"], ddof=1))


@pytest.mark.parametrize("bad, match", [
    (dict(judge="svm"), "judge must be one of"),
    (dict(x_test=torch.zeros(5, 3, 8, 8)), "x_test must have 1 channel"),
    (dict(y_train=torch.zeros(7, dtype=torch.long)), "y_train must have shape"),
    (dict(y_train=torch.full((20,), 12)), "class indices <"),
    (dict(y_train=torch.zeros(20, dtype=torch.long)), "at least 2 classes"),
    (dict(x_train=torch.full((20, 1, 8, 8), float("nan"))), "NaN"),
    (dict(x_train=torch.full((20, 1, 8, 8), 3.0)), r"scaled to \[-1, 1\]"),
    (dict(y_train=torch.zeros(20)), "integer class labels"),
])
def test_bad_inputs_name_what_to_fix(bad, match):
    args = dict(x_train=torch.rand(20, 1, 8, 8) * 2 - 1, y_train=torch.arange(20) % 10,
                x_test=torch.rand(5, 1, 8, 8) * 2 - 1, y_test=torch.arange(5), num_classes=10)
    judge = bad.pop("judge", "logreg")
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        classification_accuracy(**args, judge=judge)


def test_protocol_rejects_mismatched_synthetic(splits):
    xtr, ytr, xte, yte = splits
    with pytest.raises(ValueError, match="x_syn must be 8x8"):
        cas_protocol(xtr, ytr, torch.zeros(4, 1, 4, 4), torch.arange(4), xte, yte, judge="logreg", seeds=[0])
    with pytest.raises(ValueError, match="seeds must name"):
        cas_protocol(xtr, ytr, xtr, ytr, xte, yte, judge="logreg", seeds=[])
