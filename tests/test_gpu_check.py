import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

import gpu_check  # noqa: E402
from make_gpu_subset import load_subset, make_subset  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_the_check_stops_at_once_with_one_line():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(EXPERIMENTS / "gpu_check.py")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "gpu_check: needs a CUDA device (--dry-run runs the flow on the CPU at tiny sizes)"]


def test_the_subset_keeps_its_train_and_test_parts(tmp_path):
    path = make_subset(tmp_path / "s.npz", "sample", None, train=30, test=20)
    train, test = load_subset(path)
    assert train.images.shape == (30, 3, 32, 32) and test.images.dtype == torch.uint8 and len(test.labels) == 20
    assert train.class_names == test.class_names and len(train.class_names) == 10


def test_dry_run_runs_the_whole_flow_on_the_cpu_and_its_table_is_generated(tmp_path, capsys):
    subset = make_subset(tmp_path / "s.npz", "sample", None, train=200, test=60)
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--dry-run", "--subset", str(subset), "--tests", "tests/test_cudagraph.py",
                           "--transfer-epochs", "1", "--seeds", "0", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"date", "device", "torch", "cuda"} <= set(result["env"]) and result["dry_run"]
    assert result["tests"]["rc"] == 0 and result["tests"].get("skipped", 0) >= 2   # CUDA tests skip here
    assert result["bench"]["layers"][0]["patches_per_s"] > 0
    paper = result["paper"]
    assert len(paper["records"]) == 3 * 2 and paper["projected_s"] > paper["measured"]["transfer_s"] > 0
    assert [row["key"] for row in result["targets"]] == [t[1] for t in gpu_check.TARGETS]
    capsys.readouterr()
    assert gpu_check.main(["--table", str(out)]) == 0
    table = capsys.readouterr().out
    assert "(dry run)" in table and table.count("\n|") >= 6


def test_table_is_generated_from_the_json_with_met_missed_and_not_measured(tmp_path):
    figures = {"paper_projected_min": 8.0, "pipeline_ratio": 3.0, "layer1_fraction_of_matmul": None,
               "race_time_ratio": 0.4, "ensemble_speedup": 4.5}
    result = {"env": {"device": "Some GPU", "date": "2026-12-05T10:00:00+00:00", "torch": "2.14", "cuda": "13.0"},
              "figures": figures, "targets": gpu_check.verdicts(figures)}
    table = gpu_check.gpu_table([result])
    lines = table.splitlines()
    assert lines[0] == "| target | Some GPU, 2026-12-05 |"
    assert "| 8 (met) |" in lines[2] and "3 (**missed**)" in lines[3] and "not measured" in lines[4]
    assert "0.4 (met)" in lines[5] and "4.50x" in lines[6] and "torch 2.14, CUDA 13.0" in table
