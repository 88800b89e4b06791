"""benchmarks/accelerator.py --quick on CPU: every part measured with finite figures, the auto
choices beside explicit ones, a part that fails recorded without stopping the others, the table."""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("w1", "w2", "scale", "sweep")


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_quick_run_measures_every_part_and_records_a_failing_one(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "accelerator.py"), "--quick",
                        "--out", str(tmp_path), "--parts", ",".join(PARTS) + ",bogus"],
                       capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    printed = json.loads(p.stdout.strip().splitlines()[-1])
    with open(tmp_path / "accelerator.json") as f:
        saved = json.load(f)
    assert saved == printed
    assert saved["profile"] == "quick"
    assert saved["backend"]["backend"] == "cpu" and saved["backend"]["device_count"] >= 1
    assert list(saved["parts"]) == [*PARTS, "bogus"]

    for name in PARTS:
        part = saved["parts"][name]
        assert part["ok"] and not part.get("errors"), (name, part.get("error"), part.get("errors"))
        assert part["rows"], name
        for row in part["rows"]:
            assert _positive(row["sec_per_round"]) and _positive(row["throughput"]), (name, row)
            assert row["ratios"] and all(_positive(v) for v in row["ratios"].values()), (name, row)

    # run.group_size: auto (1 on CPU) measured beside an explicit size, and the best marked
    w1 = saved["parts"]["w1"]
    assert w1["auto"]["group_size"] == {"C=10": 1}
    assert sorted(r["group_size"] for r in w1["rows"]) == [1, 2]
    assert [r["group_size"] for r in w1["rows"] if r["auto"]] == [1]
    assert min(r["ratios"]["vs_best"] for r in w1["rows"]) == 1.0
    assert {r["method"] for r in saved["parts"]["w2"]["rows"]} == {"fedkd", "fedavg_teacher_size",
                                                                 "fedavg_student_size"}
    # run.runs_per_device: auto (1 on CPU) against an explicit count (the sequential runs: full sizes only)
    sweep = saved["parts"]["sweep"]
    assert sweep["auto"] == {"runs_per_device": 1}
    assert sorted((r["mode"], r["runs_per_device"], r["auto"]) for r in sweep["rows"]) == [
        ("batched", 1, True), ("batched", 2, False)]
    assert min(r["ratios"]["vs_best"] for r in sweep["rows"]) == 1.0

    bogus = saved["parts"]["bogus"]
    assert bogus["ok"] is False and "unknown part 'bogus'" in bogus["error"]

    with open(tmp_path / "accelerator.md") as f:
        md = f.read()
    table = md.split("| part | setting | s/round | throughput | ratios |")[1].split("\n\n")[0]
    rows = [line for line in table.strip().splitlines()[1:]]
    for name in PARTS:
        mine = [r for r in rows if r.startswith(f"| {name} |")]
        assert len(mine) == len(saved["parts"][name]["rows"]), (name, mine)
    assert [r for r in rows if r.startswith("| bogus |")] == [
        "| bogus | – | – | – | error: unknown part 'bogus'; the parts are w1, w2, scale, sweep |"]
