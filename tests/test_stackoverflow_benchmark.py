"""benchmarks/stackoverflow.py's small mode writes a corpus laid out as TFF's Stack Overflow
preprocessing makes it, checked here with numpy on the files it keeps (not its own helpers)."""

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, L = 10_000, 20
PAD, OOV, BOS, EOS = 0, V + 1, V + 2, V + 3


def test_small_corpus_sizes_and_tokens(tmp_path):
    clients, total = 2000, 800_000
    out = tmp_path / "so.json"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "stackoverflow.py"), "--clients",
                        str(clients), "--sentences", str(total), "--rounds", "0", "--dir", str(tmp_path / "pool"),
                        "--keep", "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary == json.loads(out.read_text()) and "SYNTHETIC" in summary["data"]
    (name,) = os.listdir(tmp_path / "pool")
    d = tmp_path / "pool" / name
    sizes = np.diff(np.load(d / "offsets.npy"))
    assert len(sizes) == clients and sizes.sum() == total and sizes.min() >= 1
    assert summary["sizes"] == {"min": int(sizes.min()), "median": float(np.median(sizes)),
                                "mean": float(sizes.mean()), "p99": float(np.percentile(sizes, 99)),
                                "max": int(sizes.max()), "sum": total}
    assert sizes.max() > 2000 and np.median(sizes) < sizes.mean()  # heavy-tailed
    x, y = np.load(d / "x.npy", mmap_mode="r"), np.load(d / "y.npy", mmap_mode="r")
    assert x.shape == y.shape == (total, L) and x.dtype == np.uint16 and y.dtype == np.int16
    x, y = np.asarray(x[::7]).astype(np.int64), np.asarray(y[::7]).astype(np.int64)  # every 7th sentence
    assert (x[:, 0] == BOS).all() and x.max() < V + 4 and (x[:, 1:] != BOS).all()
    assert y.min() >= -1 and y.max() < V + 4 and (y != BOS).all() and (y != PAD).all()
    np.testing.assert_array_equal(y[:, :-1], np.where(x[:, 1:] == PAD, -1, x[:, 1:]))  # targets: inputs shifted
    real = (y >= 0).sum(1)
    ends = y[np.arange(len(y)), real - 1]
    assert ((ends == EOS) | (real == L)).all() and (real >= 2).all()  # a word, then EOS unless cut at 20
    words = y[(y >= 1) & (y != EOS)]
    assert 0.02 < np.mean(words == OOV) < 0.5 and np.bincount(words)[1] > np.bincount(words)[100]  # Zipf-like
    assert summary["pool_file_gb"] * 1e9 >= total * L * 4 and summary["device_pool_gb"] * 1e9 == total * L * 8
