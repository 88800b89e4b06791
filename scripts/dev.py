#!/usr/bin/env python3
"""Set up a local virtual environment if needed, then run the experiment or the tests.

    python3 scripts/dev.py run [fedkd run options...]   # default experiment
    python3 scripts/dev.py test [pytest options...]     # test suite

Needs only Python 3.11+. Creates (or reuses) ./.venv and installs the package
with its test and file-format extras at the versions pinned in constraints.txt
(and the optional homomorphic-encryption extra when it installs); reinstalls
when pyproject.toml or constraints.txt changes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".venv")
BIN = os.path.join(VENV, "Scripts" if os.name == "nt" else "bin")
PY = os.path.join(BIN, "python")
STAMP = os.path.join(VENV, ".fedkd-install-stamp")


CONSTRAINTS = os.path.join(ROOT, "constraints.txt")


def _stamp() -> str:
    h = hashlib.sha256()
    for name in ("pyproject.toml", "constraints.txt"):
        with open(os.path.join(ROOT, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def ensure_env() -> None:
    if sys.version_info < (3, 11):
        sys.exit(f"fedkd_jax needs Python 3.11+; this is {sys.version.split()[0]}")
    if not os.path.exists(PY):
        print(f"[setup] creating virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    current = open(STAMP).read().strip() if os.path.exists(STAMP) else ""
    if current != _stamp():
        print("[setup] installing fedkd_jax and its dependencies (first run takes a few minutes)", flush=True)
        subprocess.check_call([PY, "-m", "pip", "install", "--quiet", "--upgrade", "pip"], cwd=ROOT)
        pin = ["-c", CONSTRAINTS]
        try:  # the optional 'he' extra (TenSEAL) must never block the two commands
            subprocess.check_call([PY, "-m", "pip", "install", "--quiet", "-e", ".[test,formats,he]", *pin], cwd=ROOT)
        except subprocess.CalledProcessError:
            print("[setup] the optional 'he' extra did not install; continuing without it", flush=True)
            subprocess.check_call([PY, "-m", "pip", "install", "--quiet", "-e", ".[test,formats]", *pin], cwd=ROOT)
        with open(STAMP, "w") as f:
            f.write(_stamp())


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("run", "test", "setup"):
        print(__doc__)
        return 2
    cmd, rest = sys.argv[1], sys.argv[2:]
    ensure_env()
    if cmd == "setup":
        return 0
    if cmd == "run":
        argv = [os.path.join(BIN, "fedkd"), "run", *rest]
    else:
        argv = [PY, "-m", "pytest", *rest]
    return subprocess.call(argv, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
