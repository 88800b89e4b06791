"""The standard-benchmark configs (issue 17 item 6): each one runs for two rounds
on a tiny fixture in the format its command reads (tests/readers_fixtures.py),
and its settings are the papers' (literal values below, written from the
sources, not read from the YAML).

Sources: Reddi et al. 2021's companion code docs (google-research/federated,
optimization/docs/hyperparameters.md: task settings and the best FedAdam rates
in log10); pfl-research's benchmarks/image_classification/configs/baseline.yaml.
Only data.path, run.rounds, run.cohort_size, run.eval_every, model.width (and
Stack Overflow's data.vocab_size) and the run's housekeeping (progress,
checkpoints, dispatch) are overridden for the runs.
"""

import json
import math
import os

import numpy as np
import pytest

from fedkd_jax.config import load_config
from fedkd_jax.runner import run_experiment
from tests import readers_fixtures as fx

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "configs")

# Reddi et al. 2021: the companion code's task settings and best FedAdam rates (log10).
REDDI = {
    "reddi_emnist_cr": dict(task="classification", kind="femnist_cnn_dropout", rounds=1500, cohort=10, batch=20,
                            client_lr=10 ** -1.5, server_lr=10 ** -2.5, tau=10 ** -4),
    "reddi_shakespeare": dict(task="next_token", kind="char_lstm", rounds=1200, cohort=10, batch=4,
                              client_lr=10 ** 0, server_lr=10 ** -2, tau=10 ** -3),
    "reddi_stackoverflow_nwp": dict(task="next_token", kind="nwp_lstm", rounds=1500, cohort=50, batch=16,
                                    client_lr=10 ** -0.5, server_lr=10 ** -2, tau=10 ** -5),
    "reddi_cifar100": dict(task="classification", kind="resnet18_gn", rounds=4000, cohort=10, batch=20,
                           client_lr=10 ** -1.5, server_lr=10 ** 0, tau=10 ** -1),
}


def _emnist(tmp_path, rng):
    def records(n):
        return [fx.encode_example(pixels=rng.random((28, 28)).astype(np.float32), label=[int(rng.integers(0, 62))])
                for _ in range(n)]

    return fx.tff_sqlite(tmp_path / "emnist_all.sqlite", {
        "all_train": {"f0000_01": records(6), "f0001_02": records(4), "f0002_03": records(5)},
        "all_test": {"f0000_01": records(2), "f0001_02": records(1), "f0002_03": records(2)}})


def _shakespeare(tmp_path, rng):
    pytest.importorskip("h5py")
    fx.tff_hdf5(tmp_path / "shakespeare_train.h5", {
        "THE_TEMPEST_ARIEL": {"snippets": [b"All hail, great master! grave sir, hail!", b"I come"]},
        "KING_LEAR_FOOL": {"snippets": [b"Nuncle, give me an egg", b"Marry, here's grace"]},
        "HAMLET_HORATIO": {"snippets": [b"So have I heard and do in part believe it."]}})
    fx.tff_hdf5(tmp_path / "shakespeare_test.h5", {"KING_LEAR_FOOL": {"snippets": [b"Fool, fool!"]},
                                                   "HAMLET_HORATIO": {"snippets": [b"Well, sit we down"]}})
    return str(tmp_path / "shakespeare_train.h5")


def _stackoverflow(tmp_path, rng):
    words = "how do i sort a list of lists in python ? it is not working with the key".split()

    def sentences(n):
        return [fx.encode_example(tokens=[" ".join(rng.choice(words, int(rng.integers(3, 25)))).encode()],
                                  title=[b"t"], score=[1]) for _ in range(n)]

    return fx.tff_sqlite(tmp_path / "stackoverflow.sqlite", {
        "train": {"u1": sentences(5), "u2": sentences(3), "u3": sentences(4)},
        "test": {"u1": sentences(2), "u4": sentences(2)},
        "heldout": {"u5": sentences(1)}})


def _cifar100(tmp_path, rng):
    pytest.importorskip("h5py")

    def client(n):
        return {"image": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), "label": rng.integers(0, 100, n),
                "coarse_label": rng.integers(0, 20, n)}

    fx.tff_hdf5(tmp_path / "fed_cifar100_train.h5", {"0": client(4), "1": client(3), "2": client(5)})
    fx.tff_hdf5(tmp_path / "fed_cifar100_test.h5", {"0": client(3)})
    return str(tmp_path / "fed_cifar100_train.h5")


def _cifar10(tmp_path, rng):
    # 600 images: 100 held out, 500 dealt (resampled) to the 1,000 users of 50. A pool near 50 rows
    # would make the resampling's rejection of repeated rows almost never accept (it hangs).
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        fx.cifar_batch(d / name, rng.integers(0, 256, (100, 3072), dtype=np.uint8), rng.integers(0, 10, 100))
    fx.cifar_batch(d / "batches.meta", np.zeros((0, 3072), np.uint8), [])
    return str(tmp_path)


FIXTURES = {"reddi_emnist_cr": _emnist, "reddi_shakespeare": _shakespeare,
            "reddi_stackoverflow_nwp": _stackoverflow, "reddi_cifar100": _cifar100, "pfl_cifar10": _cifar10}


def _load(name, path, cohort, width, extra=()):
    return load_config(os.path.join(CONFIGS, f"{name}.yaml"), [
        f"data.path={path}", "run.rounds=2", f"run.cohort_size={cohort}", "run.eval_every=2",
        f"model.width={width}", "run.progress=false", "run.checkpoint_every=2", "run.rounds_per_dispatch=2",
        *extra])


def _run_two_rounds(cfg, out):
    res = run_experiment(cfg, str(out), progress=False)
    assert [r["round"] for r in res.rows] == [1, 2]
    assert all(np.isfinite(r["train_loss"]) for r in res.rows)
    assert np.isfinite(res.rows[-1]["test_accuracy"])
    return res


@pytest.mark.parametrize("name", sorted(REDDI))
def test_reddi_configs_hold_the_papers_settings_and_run(name, tmp_path):
    want = REDDI[name]
    path = FIXTURES[name](tmp_path, np.random.default_rng(17))
    # a 50-word vocabulary for Stack Overflow: with the 10,004-way output one evaluation of the
    # fixture takes several times the rest of the run; the configured 10,000 is checked below
    cfg = _load(name, path, cohort=2, width=1 / 16,
                extra=["data.vocab_size=50"] if name == "reddi_stackoverflow_nwp" else ())
    # what the paper (its companion code) ran; no key checked here is overridden
    assert cfg.algorithm == "fedavg" and cfg.data.dataset == "tff" and cfg.data.partition == "natural"
    assert cfg.data.task == want["task"] and cfg.model.kind == want["kind"]
    assert cfg.client.optimizer == "sgd" and cfg.client.local_epochs == 1 and cfg.client.batch_size == want["batch"]
    assert cfg.client.weighting == "examples"
    assert math.isclose(cfg.client.lr, want["client_lr"], rel_tol=1e-6)
    assert cfg.server.optimizer == "fedadam"
    assert math.isclose(cfg.server.lr, want["server_lr"], rel_tol=1e-6)
    assert math.isclose(cfg.server.tau, want["tau"], rel_tol=1e-6)
    assert (cfg.server.b1, cfg.server.b2, cfg.server.adaptive_form) == (0.9, 0.999, "optax")  # Keras' Adam
    full = load_config(os.path.join(CONFIGS, f"{name}.yaml"), [f"data.path={path}"])
    assert full.run.rounds == want["rounds"] and full.run.cohort_size == want["cohort"]
    if name == "reddi_stackoverflow_nwp":
        assert (full.data.vocab_size, full.data.seq_len, full.data.max_examples_per_client) == (10000, 20, 256)
    if name == "reddi_shakespeare":
        assert cfg.data.seq_len == 80
    res = _run_two_rounds(cfg, tmp_path / "run")
    with open(os.path.join(res.run_dir, "config.json")) as f:
        saved = json.load(f)
    assert saved["model"]["kind"] == want["kind"] and saved["server"]["tau"] == cfg.server.tau


def test_pfl_cifar10_config_holds_the_benchmark_settings_and_runs(tmp_path):
    path = _cifar10(tmp_path, np.random.default_rng(18))
    full = load_config(os.path.join(CONFIGS, "pfl_cifar10.yaml"), [f"data.path={path}"])
    # baseline.yaml: cifar10_iid, 50 datapoints per user (1,000 users), cohort 50, 1,500 central
    # iterations, local SGD 0.1 for 1 epoch of batch 10, central SGD 1.0, weight_by_samples false
    d = full.data
    assert (d.dataset, d.partition, d.num_clients, d.examples_per_client, d.test_fraction) == \
        ("cifar10", "iid", 1000, 50, 0.0)
    assert round(d.global_test_fraction * 60000) == 10000
    assert (full.run.rounds, full.run.cohort_size, full.run.eval_every) == (1500, 50, 10)
    assert (full.client.optimizer, full.client.lr, full.client.batch_size, full.client.local_epochs) == \
        ("sgd", 0.1, 10, 1)
    assert full.client.weighting == "uniform"
    assert (full.algorithm, full.server.optimizer, full.server.lr) == ("fedavg", "fedavg", 1.0)
    # simple_cnn (two unpadded 3x3 convolutions of 32 and 64, one 2x2 pool, dense 128) is this model
    assert full.model.kind == "femnist_cnn_dropout" and full.model.width == 1.0
    cfg = _load("pfl_cifar10", path, cohort=3, width=1 / 8)
    _run_two_rounds(cfg, tmp_path / "run")


def test_pfl_simple_cnn_parameter_count():
    """pfl-research's simple_cnn on 32x32x3, 10 classes, by hand: conv 3*3*3*32+32, conv 3*3*32*64+64,
    dense 14*14*64*128+128, head 128*10+10."""
    import fedkd_jax as fk

    want = (27 * 32 + 32) + (288 * 64 + 64) + (14 * 14 * 64 * 128 + 128) + (128 * 10 + 10)
    m = fk.make_model("femnist_cnn_dropout", num_features=3072, num_classes=10, image_shape=(32, 32, 3))
    assert m.num_params == want == 1_626_442
