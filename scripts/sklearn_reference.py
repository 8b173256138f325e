#!/usr/bin/env python3
"""Reference OOD metrics from scikit-learn for the engine's metric tests.

Writes crates/engine/tests/data/sklearn_reference.json: fixed score vectors (InD and OOD, higher
score = more in-distribution) and the values DiffGuard's ood_tester/metrics.py computes for them
with scikit-learn (InD positive for AUROC / FPR@95 / AUPR-In, OOD positive on 1 - score for
AUPR-Out). Also ViM and KNN scores as OpenOOD computes them (numpy/scikit-learn), on fixed random features.
The Rust tests crates/engine/tests/eval_metrics.rs and eval_baselines.rs compare against these.

Run (once, the output is committed):
    python3 -m venv /work/.venv-sk && /work/.venv-sk/bin/pip install scikit-learn
    /work/.venv-sk/bin/python scripts/sklearn_reference.py
"""
import json
import pathlib

import numpy as np
import sklearn
from sklearn import metrics


def reference(ind, ood):
    conf = np.concatenate([ind, ood])
    is_ind = np.concatenate([np.ones(len(ind)), np.zeros(len(ood))])
    fpr, tpr, _ = metrics.roc_curve(is_ind, conf)
    p_in, r_in, _ = metrics.precision_recall_curve(is_ind, conf)
    p_out, r_out, _ = metrics.precision_recall_curve(1 - is_ind, 1 - conf)
    return {
        "auroc": metrics.auc(fpr, tpr),
        "fpr_at_95": float(fpr[np.argwhere(tpr >= 0.95)[0]][0]),
        "aupr_in": metrics.auc(r_in, p_in),
        "aupr_out": metrics.auc(r_out, p_out),
    }


def cases():
    rng = np.random.RandomState(0)
    yield "continuous", rng.normal(1.0, 1.0, 200), rng.normal(0.0, 1.0, 300)
    # Heavy ties: one decimal, overlapping classes.
    yield "ties", np.round(rng.normal(0.6, 0.5, 150), 1), np.round(rng.normal(0.0, 0.5, 120), 1)
    # A saturated score (like MSP in f32): many samples of both sets exactly at 1.0.
    ind = np.minimum(1.0, rng.uniform(0.7, 1.6, 100))
    ood = np.minimum(1.0, rng.uniform(0.3, 1.1, 80))
    yield "saturated", ind, ood
    # A tie group of one InD and one OOD sample at each of two scores makes three collinear ROC
    # points; sklearn drops the middle one, which is exactly where TPR first reaches 0.95.
    yield "collinear", np.array([10.0] * 18 + [5.0, 4.0]), np.array([5.0, 4.0] + [0.0] * 18)
    yield "tiny", np.array([1.0, 0.5]), np.array([0.5, 0.0])
    # OOD scored higher than InD: a detector that is worse than chance.
    yield "inverted", rng.normal(-1.0, 1.0, 50), rng.normal(0.5, 1.0, 70)


def vim_reference():
    """OpenOOD's VIMPostprocessor (setup + postprocess) on a fixed random case."""
    from numpy.linalg import norm, pinv
    from scipy.special import logsumexp
    from sklearn.covariance import EmpiricalCovariance

    rng = np.random.RandomState(1)
    d, c, dim = 6, 4, 3
    train = rng.normal(0, 1, (200, d)) * np.array([3.0, 2.0, 1.5, 0.5, 0.3, 0.2]) + 0.4
    w, b = rng.normal(0, 1, (c, d)), rng.normal(0, 1, c)
    queries = rng.normal(0, 1.5, (10, d))
    u = -np.matmul(pinv(w), b)
    logit_train = train @ w.T + b
    ec = EmpiricalCovariance(assume_centered=True)
    ec.fit(train - u)
    eig_vals, eigen_vectors = np.linalg.eig(ec.covariance_)
    ns = np.ascontiguousarray((eigen_vectors.T[np.argsort(eig_vals * -1)[dim:]]).T)
    vlogit_train = norm(np.matmul(train - u, ns), axis=-1)
    alpha = logit_train.max(axis=-1).mean() / vlogit_train.mean()
    logit_q = queries @ w.T + b
    scores = -norm(np.matmul(queries - u, ns), axis=-1) * alpha + logsumexp(logit_q, axis=-1)
    return {
        "train": train.tolist(), "w": w.tolist(), "b": b.tolist(), "dim": dim,
        "queries": queries.tolist(), "u": u.tolist(), "alpha": float(alpha), "scores": scores.tolist(),
    }


def knn_reference():
    """OpenOOD's KNNPostprocessor (normalise, faiss IndexFlatL2, −distance² to the k-th) in numpy."""
    rng = np.random.RandomState(2)
    bank, queries, k = rng.normal(0, 1, (300, 8)), rng.normal(0, 1, (12, 8)), 7
    normalize = lambda x: x / (np.linalg.norm(x, ord=2, axis=-1, keepdims=True) + 1e-10)
    bn, qn = normalize(bank), normalize(queries)
    d2 = ((qn[:, None, :] - bn[None, :, :]) ** 2).sum(-1)
    scores = -np.sort(d2, axis=1)[:, k - 1]
    return {"bank": bank.tolist(), "queries": queries.tolist(), "k": k, "scores": scores.tolist()}


def main():
    out = {"sklearn_version": sklearn.__version__, "cases": [], "vim": vim_reference(), "knn": knn_reference()}
    for name, ind, ood in cases():
        out["cases"].append(
            {"name": name, "ind": ind.tolist(), "ood": ood.tolist(), "expected": reference(ind, ood)}
        )
    path = pathlib.Path(__file__).resolve().parent.parent / "crates/engine/tests/data/sklearn_reference.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    for c in out["cases"]:
        print(c["name"], c["expected"])


if __name__ == "__main__":
    main()
