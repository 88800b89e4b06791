"""The persistent compilation cache: on by default for the CLI, switchable off, the user's
own JAX cache kept, an unwritable directory a warning (subprocesses: JAX reads its cache
settings once per process)."""

import os
import subprocess
import sys

PROBE = ("import jax, json; from fedkd_jax.compile_cache import configure_compile_cache as c; "
         "p = c(); print(json.dumps([p, jax.config.jax_compilation_cache_dir, "
         "jax.config.jax_compilation_cache_max_size]))")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "FEDKD_COMPILE_CACHE")}
    env.update(extra)
    return env


def _probe(**extra):
    import json

    out = subprocess.run([sys.executable, "-c", PROBE], env=_env(**extra), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-1500:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def test_the_cache_is_per_user_switchable_and_respects_a_users_own(tmp_path):
    from fedkd_jax.compile_cache import MAX_BYTES

    (path, jax_dir, size), _ = _probe(XDG_CACHE_HOME=str(tmp_path / "xdg"))
    assert path == jax_dir == str(tmp_path / "xdg" / "fedkd_jax" / "jax-compile-cache") and size == MAX_BYTES
    (path, jax_dir, _), _ = _probe(FEDKD_COMPILE_CACHE="off")
    assert path is None and not jax_dir
    mine = str(tmp_path / "mine")
    (path, jax_dir, _), _ = _probe(JAX_COMPILATION_CACHE_DIR=mine)
    assert path == jax_dir == mine
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    (path, jax_dir, _), err = _probe(FEDKD_COMPILE_CACHE=str(blocker / "cache"))
    assert path is None and not jax_dir and "cannot write" in err


def test_a_second_cli_run_loads_the_round_from_the_cache(tmp_path):
    cache = tmp_path / "cache"
    args = [sys.executable, "-m", "fedkd_jax.cli", "run", "--set", "algorithm=fedavg", "--set", "run.rounds=2",
            "--set", "data.num_clients=8", "--set", "run.cohort_size=4", "--set", "run.progress=false"]
    first = subprocess.run(args + ["--out", str(tmp_path / "a")], env=_env(FEDKD_COMPILE_CACHE=str(cache)),
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-1500:]
    entries = [f for f in os.listdir(cache) if f.endswith("-cache")]
    assert entries  # the round was written
    second = subprocess.run(args + ["--out", str(tmp_path / "b")], env=_env(FEDKD_COMPILE_CACHE=str(cache)),
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-1500:]
    assert sorted(f for f in os.listdir(cache) if f.endswith("-cache")) == sorted(entries)  # nothing new compiled
