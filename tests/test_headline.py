import importlib.util
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "experiments" / "headline.py"
SPEC = importlib.util.spec_from_file_location("headline", SCRIPT)
headline = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(headline)


def write_transfer(folder: Path, run: str, acc: float) -> None:
    (folder / run).mkdir(parents=True)
    (folder / run / "results.json").write_text(json.dumps({"records": [{"test_acc": acc}]}))


def test_table_takes_every_seed_the_first_name_with_a_run_and_bolds_the_best(tmp_path):
    rows = [{"name": name, "seed": seed, "accs": {"block_1": base + seed, "blocks_1..2": base + 2 + seed,
                                                   "blocks_1..3": base + 3 + seed}}
            for name, base in (("lw", 80.0), ("sup", 79.0), ("rand", 70.0)) for seed in (0, 1, 2)]
    rows.append({"name": "other", "seed": 0, "accs": {"block_1": 99.0}})
    (tmp_path / "results.jsonl").write_text("\n".join(map(json.dumps, rows)))
    for mode in ("frozen-cos", "ft-cos"):
        for k in (1, 2, 3):
            for seed in (0, 1):
                write_transfer(tmp_path / mode, f"sup-k{k}-seed{seed}", 0.80 + seed / 100)
                write_transfer(tmp_path / mode, f"rand-k{k}-seed{seed}", 0.60)
                write_transfer(tmp_path / mode, f"old-k{k}-seed{seed}", 0.70 + seed / 100)  # the earlier name
            write_transfer(tmp_path / mode, f"new-k{k}-seed0", 0.92)  # the first name wins where it has a run
    out = subprocess.run([sys.executable, str(SCRIPT), "--ablate", str(tmp_path / "results.jsonl"),
                          "--transfers", str(tmp_path), "--layerwise-linear", "lw", "--layerwise-runs", "new,old",
                          "--supervised-linear", "sup", "--supervised-runs", "sup",
                          "--random-linear", "rand", "--random-runs", "rand"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    layerwise, supervised, random = (line.split(" | ")[1:] for line in out[2:5])
    assert layerwise[:3] == ["**81.0 ± 1.0**", "**83.0 ± 1.0**", "**84.0 ± 1.0**"]  # linear: seeds 0-2, not "other"
    assert supervised[:3] == ["80.0 ± 1.0", "82.0 ± 1.0", "83.0 ± 1.0"]
    assert layerwise[3] == "**81.5 ± 14.8**"  # frozen k=1: new's seed 0 (92), old's seed 1 (71)
    assert supervised[3] == "80.5 ± 0.7"
    assert random[3] == "60.0 ± 0.0"
    assert out[-1] == "seeds: linear 0, 1, 2; frozen 0, 1; finetune 0, 1"


def test_a_cell_of_fewer_seeds_says_how_many():
    cells = {(init, readout, k): [80.0, 81.0, 82.0] for init in headline.INITS for readout in headline.READOUTS
             for k in headline.DEPTHS}
    cells[(headline.INITS[2], "linear", 1)] = [70.0, 71.0]
    lines = headline.table(cells).splitlines()
    assert lines[4].split(" | ")[1] == "70.5 ± 0.7 (2 seeds)"
    assert lines[2].split(" | ")[1] == lines[3].split(" | ")[1] == "**81.0 ± 1.0**"  # a tie: both in bold


def test_readouts_picks_the_columns(tmp_path):
    rows = [{"name": name, "seed": seed, "accs": {"block_1": 80.0 + seed}} for name in ("lw", "sup", "rand")
            for seed in (0, 1)]
    (tmp_path / "results.jsonl").write_text("\n".join(map(json.dumps, rows)))
    for seed in (0, 1):
        write_transfer(tmp_path / "frozen-cos", f"sup-k1-seed{seed}", 0.8)
    run = [sys.executable, str(SCRIPT), "--ablate", str(tmp_path / "results.jsonl"), "--transfers", str(tmp_path),
           "--layerwise-linear", "lw", "--supervised-linear", "sup", "--supervised-runs", "sup",
           "--random-linear", "rand"]
    out = subprocess.run(run + ["--readouts", "linear,frozen"], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0].count("k=") == 6 and "finetune" not in out
    assert out.splitlines()[-1] == "seeds: linear 0, 1; frozen 0, 1"
    bad = subprocess.run(run + ["--readouts", "linear,probe"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--readouts takes" in bad.stderr
