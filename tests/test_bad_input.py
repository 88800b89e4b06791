"""Every bad input gets an error naming the field and what is allowed, before compiling."""

import os
import subprocess
import sys

import numpy as np
import pytest

import fedkd_jax as fk
from fedkd_jax.config import load_config
from fedkd_jax.errors import ConfigError, DataError
from fedkd_jax.runner import run_experiment


@pytest.mark.parametrize(
    "override, field, words",
    [
        ("data.dataset=cifar", "data.dataset", "digits, mnist5k, synthetic, npz"),
        ("data.partition=zipf", "data.partition",
         "iid, dirichlet, dirichlet_balanced, dirichlet_client, shards, quantity, natural"),
        ("client.lr=0", "client.lr", "positive"),
        ("client.lr=-0.1", "client.lr", "positive"),
        ("client.batch_size=0", "client.batch_size", "positive integer"),
        ("run.rounds=0", "run.rounds", "positive integer"),
        ("data.alpha=-1", "data.alpha", "positive"),
        ("data.alpha=0", "data.alpha", "positive"),
        ("run.cohort_size=101", "run.cohort_size", "at most data.num_clients"),
        ("data.typo=1", "data.typo", "allowed keys in 'data'"),
        ("nosuch=1", "nosuch", "allowed top-level keys"),
        ("run.rounds=ten", "run.rounds", "Integer"),
        ("algorithm=fedsgd", "algorithm", "fedavg"),
        ("server.optimizer=sgd", "server.optimizer", "fedavg, fedavgm, fedadam, fedyogi"),
        ("server.adaptive_form=paper", "server.adaptive_form", "reddi, optax"),
        ("model.kind=resnet", "model.kind", "mlp, cnn"),
        ("run.devices=foo", "run.devices", "must be 'all' or a positive integer"),
        ("run.devices=0", "run.devices", "must be 'all' or a positive integer"),
        ("run.devices=2.5", "run.devices", "must be 'all' or a positive integer"),
        ("secagg.frac_bits=fine", "secagg.frac_bits", "must be 'auto' or an integer >= 0"),
        ("secagg.frac_bits=-1", "secagg.frac_bits", "must be 'auto' or an integer >= 0"),
    ],
)
def test_config_errors_name_field_and_allowed_values(override, field, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert e.value.field == field
    assert words in str(e.value)


def test_documented_word_defaults_and_old_nulls_are_accepted(tmp_path):
    """The README's defaults ``run.devices=all`` and ``secagg.frac_bits=auto`` can be
    written out; integers stay integers; null (older configs) loads as the word."""
    from fedkd_jax.config import devices_value, frac_bits_value, from_dict, to_dict

    cfg = load_config(None, ["run.devices=all", "secagg.frac_bits=auto"])
    assert (cfg.run.devices, cfg.secagg.frac_bits) == ("all", "auto")
    assert devices_value(cfg.run.devices) is None and frac_bits_value(cfg.secagg.frac_bits) is None
    cfg = load_config(None, ["run.devices=2", "secagg.frac_bits=0"])
    assert (cfg.run.devices, cfg.secagg.frac_bits) == (2, 0)
    assert to_dict(cfg)["run"]["devices"] == 2
    old = to_dict(load_config(None, []))
    old["run"]["devices"], old["secagg"]["frac_bits"] = None, None
    assert (from_dict(old).run.devices, from_dict(old).secagg.frac_bits) == ("all", "auto")
    path = tmp_path / "old.yaml"
    path.write_text("run:\n  devices: null\nsecagg:\n  frac_bits: null\n")
    assert load_config(str(path)).run.devices == "all"


def _npz(tmp_path, x, y, **extra):
    p = tmp_path / "bad.npz"
    np.savez(p, x=x, y=y, **extra)
    return str(p)


def test_nan_features_rejected(tmp_path):
    x = np.ones((20, 3), np.float32)
    x[7, 1] = np.nan
    ds = fk.data.load_npz(_npz(tmp_path, x, np.arange(20) % 2))
    with pytest.raises(DataError, match="row 7") as e:
        fk.federate(ds, partition="iid", num_clients=2, seed=0)
    assert e.value.field == "data.x"


def test_inf_features_rejected(tmp_path):
    x = np.ones((20, 3), np.float32)
    x[3, 0] = np.inf
    ds = fk.data.load_npz(_npz(tmp_path, x, np.arange(20) % 2))
    with pytest.raises(DataError, match="finite"):
        fk.federate(ds, partition="iid", num_clients=2, seed=0)


def test_labels_out_of_range_rejected(tmp_path):
    y = np.arange(20) % 3
    y[5] = -1
    ds = fk.data.load_npz(_npz(tmp_path, np.ones((20, 3)), y))
    with pytest.raises(DataError, match=r"\[0, 3\)") as e:
        fk.federate(ds, partition="iid", num_clients=2, seed=0)
    assert e.value.field == "data.y"
    ds2 = fk.data.load_npz(_npz(tmp_path, np.ones((20, 3)), np.arange(20) % 3), num_classes=2)
    with pytest.raises(DataError, match="label 2"):
        fk.federate(ds2, partition="iid", num_clients=2, seed=0)


def test_client_without_examples_rejected(tmp_path):
    ids = np.array([0, 0, 2, 2, 0, 2] * 3)  # client 1 has nothing
    ds = fk.data.load_npz(_npz(tmp_path, np.ones((18, 2)), np.arange(18) % 2, client=ids))
    with pytest.raises(DataError, match="client 1 has no examples"):
        fk.federate(ds, partition="natural", num_clients=3, seed=0)


def test_more_clients_than_examples_rejected(digits):
    with pytest.raises(DataError, match="at most") as e:
        fk.federate(digits, partition="iid", num_clients=5000, seed=0)
    assert e.value.field == "data.num_clients"


def test_cohort_larger_than_population_rejected(digits20):
    model = fk.make_model("mlp", num_features=64, num_classes=10, hidden=())
    import optax

    alg = fk.fedavg(model, optax.sgd(0.1), optax.sgd(1.0), batch_size=5)
    with pytest.raises(ConfigError, match=r"\[1, 20\]") as e:
        fk.Simulator(alg, digits20, cohort_size=21)
    assert e.value.field == "run.cohort_size"


def test_missing_npz_file_and_keys(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        fk.data.load_npz(str(tmp_path / "nope.npz"))
    p = tmp_path / "k.npz"
    np.savez(p, features=np.ones((3, 2)))
    with pytest.raises(DataError, match="lacks"):
        fk.data.load_npz(str(p))


def test_bad_data_raises_before_run_dir_is_created(tmp_path):
    x = np.ones((30, 3), np.float32)
    x[0, 0] = np.nan
    cfg = load_config(None, ["data.dataset=npz", f"data.path={_npz(tmp_path, x, np.arange(30) % 2)}", "data.num_clients=3", "run.cohort_size=2"])
    out = tmp_path / "run"
    with pytest.raises(DataError):
        run_experiment(cfg, str(out), progress=False)
    assert not out.exists()


def _cli(*args, cwd):
    env = dict(os.environ, FEDKD_CPU_DEVICES="1")
    return subprocess.run([sys.executable, "-m", "fedkd_jax.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_cli_prints_error_without_traceback_and_exits_2(tmp_path):
    for args, field in [
        (["run", "--set", "data.dataset=cifar"], "data.dataset"),
        (["run", "--set", "run.cohort_size=0"], "run.cohort_size"),
        (["run", "--set", "data.num_clients=5000", "--set", "data.partition=iid", "--out", str(tmp_path / "x")], "data.num_clients"),
        (["run", "--config", str(tmp_path / "missing.yaml")], "--config"),
    ]:
        p = _cli(*args, cwd=tmp_path)
        assert p.returncode == 2, (args, p.stderr)
        assert "Traceback" not in p.stderr
        assert f"fedkd: error: {field}:" in p.stderr


def test_existing_run_is_never_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"round": 1}\n')
    p = _cli("run", "--out", str(out), "--set", "run.rounds=1", cwd=tmp_path)
    assert p.returncode == 2 and "cannot be resumed" in p.stderr
    assert (out / "metrics.jsonl").read_text() == '{"round": 1}\n'


def test_malformed_config_files_and_seeds_get_clear_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: {rounds: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML") as e:
        load_config(str(bad))
    assert e.value.field == "--config"
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(lst))
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"run.seed={2**63}"])
    assert e.value.field == "run.seed"


class _CompileCounter:
    def __init__(self):
        import jax

        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on)

    def _on(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1


def test_every_user_named_path_is_checked_before_compiling(tmp_path, capsys):
    from fedkd_jax.cli import main

    notes = tmp_path / "notes.txt"
    notes.write_text("not an archive\n")
    npy = tmp_path / "arr.npy"
    np.save(npy, np.ones(3))
    afile = tmp_path / "afile"
    afile.write_text("x")
    cfgdir = tmp_path / "cfgdir"
    cfgdir.mkdir()
    small = ["--set", "algorithm=fedavg", "--set", "run.rounds=1", "--set", "data.num_clients=4", "--set", "run.cohort_size=2"]
    cases = [
        (["run", "--set", "data.dataset=npz", "--set", f"data.path={notes}"], "data.path", "not a NumPy archive"),
        (["run", "--set", "data.dataset=npz", "--set", f"data.path={npy}"], "data.path", ".npy"),
        (["run", "--set", "data.dataset=npz", "--set", f"data.path={cfgdir}"], "data.path", "directory"),
        (["run", *small, "--out", str(afile)], "--out", "is a file"),
        (["run", *small, "--out", str(afile / "sub")], "--out", "is a file"),
        (["run", *small, "--out", "/proc/fedkd-run"], "--out", "not writable"),
        (["run", "--config", str(cfgdir)], "--config", "is a directory"),
        (["run", *small, "--set", "algorithm=feddf", "--set", "data.proxy=npz", "--set", f"data.proxy_path={notes}"],
         "data.proxy_path", "not a NumPy archive"),
        (["resume", str(afile)], "run_dir", "is a file"),
        (["resume", str(tmp_path / "nothing")], "run_dir", "no such directory"),
        (["resume", str(cfgdir)], "run_dir", "no config.json"),
    ]
    counter = _CompileCounter()
    for args, field, words in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert f"fedkd: error: {field}:" in err and words in err, (args, err)
    assert counter.count == 0  # nothing was compiled for any of them
    assert afile.read_text() == "x" and not (tmp_path / "runs").exists()


def test_data_file_of_the_wrong_format_via_cli_has_no_traceback(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n")
    p = _cli("run", "--set", "data.dataset=npz", "--set", f"data.path={notes}", cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "fedkd: error: data.path:" in p.stderr
