"""``vitlab eval --knn`` / ``--linear-probe`` against scikit-learn on the same frozen features, for a
``vitlab pretrain`` checkpoint (no classifier) and a ``vitlab train`` checkpoint."""
import json
import os

import numpy as np
import pytest
import torch

import vitlab
from vitlab.cli import main
from vitlab.engine.checkpoint import load_checkpoint
from vitlab.errors import UserError


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from vitlab.pretrain.config import PretrainConfig
    from vitlab.pretrain.runner import pretrain

    out = str(tmp_path_factory.mktemp("rep") / "mae")
    pretrain(PretrainConfig(method="mae", epochs=1, max_steps=2, batch_size=16, eval="none", progress=False,
                            log_interval=0, workers=0, out=out), log=lambda *_: None)
    return os.path.join(out, "checkpoints", "last.pt")


def _hand_features(ckpt, num_classes):
    """Pooled pre-logits of the digits splits, the model rebuilt by hand from the checkpoint."""
    from vitlab.data import build_dataset_pair, build_eval_transform

    state = load_checkpoint(ckpt)
    kw = dict(state.get("model_kwargs") or state["config"]["model_kwargs"])
    model = vitlab.create_model(state.get("model_name") or state["config"]["model"], num_classes=num_classes,
                                img_size=state["img_size"], in_chans=state["in_chans"], **kw).eval()
    model.load_state_dict(state["model"])
    tf = build_eval_transform(state["img_size"], state["in_chans"], state["data"]["mean"], state["data"]["std"], 1.0)
    train, val, _ = build_dataset_pair("digits")
    out = []
    for ds in (train, val):
        xs = torch.stack([tf(ds[i][0]) for i in range(len(ds))])
        ys = np.array([ds[i][1] for i in range(len(ds))])
        with torch.no_grad():
            f = torch.cat([model.forward_head(model.forward_features(xs[i:i + 500]), pre_logits=True)
                           for i in range(0, len(xs), 500)])
        out.append((f.double().numpy(), ys))
    return out


def _sklearn_scores(feats, k=20, t=0.07):
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    (xtr, ytr), (xva, yva) = feats
    knn = KNeighborsClassifier(n_neighbors=k, metric="cosine", weights=lambda d: np.exp(-d / t))
    knn_acc = 100 * (knn.fit(xtr, ytr).predict(xva) == yva).mean()
    mean, std = xtr.mean(0), np.sqrt(xtr.var(0) + 1e-6)
    probe = LogisticRegression(C=1.0, max_iter=1000).fit((xtr - mean) / std, ytr)
    return knn_acc, 100 * (probe.predict((xva - mean) / std) == yva).mean()


def test_knn_and_linear_probe_of_a_pretrain_checkpoint_equal_sklearn(pretrained, tmp_path, capsys):
    rc = main(["eval", "--checkpoint", pretrained, "--knn", "--linear-probe", "--out", str(tmp_path / "ev")])
    assert rc == 0
    printed = capsys.readouterr().out
    m = json.loads((tmp_path / "ev" / "representation.json").read_text())
    assert m["images"] == 1000 and m["train_images"] == 4000 and "k-NN top-1" in printed
    knn_acc, probe_acc = _sklearn_scores(_hand_features(pretrained, 0))
    assert m["knn_top1"] == pytest.approx(knn_acc, abs=0.1 + 1e-9)  # at most one tie broken otherwise
    assert m["linear_probe_top1"] == pytest.approx(probe_acc, abs=0.2 + 1e-9)
    assert m["linear_probe_top1"] > 30 and m["knn_top1"] > 30  # far above chance (10%) even after 2 steps


def test_knn_of_a_train_checkpoint_ignores_its_classifier(tmp_path):
    from vitlab.engine import TrainConfig, train
    from vitlab.engine.represent import evaluate_representation

    cfg = TrainConfig(out=str(tmp_path / "run"), epochs=1, max_steps=2, batch_size=16, progress=False, workers=0,
                      threads=1, amp="none", log_interval=0)
    train(cfg, log=lambda *_: None)
    ckpt = str(tmp_path / "run" / "checkpoints" / "last.pt")
    m = evaluate_representation(ckpt, knn=True, probe=False)
    assert m["checkpoint_kind"] == "train" and m["feature_dim"] == 64 and "linear_probe_top1" not in m
    knn_acc, _ = _sklearn_scores(_hand_features(ckpt, 10))
    assert m["knn_top1"] == pytest.approx(knn_acc, abs=0.1 + 1e-9)


def test_representation_bad_input_is_one_line(pretrained, tmp_path, capsys):
    from vitlab.engine.represent import evaluate_representation

    with pytest.raises(UserError, match="--knn-k 0"):
        evaluate_representation(pretrained, knn=True, k=0)
    with pytest.raises(UserError, match="holds no EMA"):
        evaluate_representation(pretrained, knn=True, ema=True)
    bogus = tmp_path / "x.pt"
    torch.save({"img_size": 28, "in_chans": 1}, bogus)
    assert main(["eval", "--checkpoint", str(bogus), "--knn"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bogus) in err[0]
