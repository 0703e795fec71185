import importlib.util
from pathlib import Path

SPEC = importlib.util.spec_from_file_location("study_table", Path(__file__).parents[1] / "experiments" / "study_table.py")
study_table = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(study_table)


def test_pivot_puts_depths_in_columns_and_averages_seeds():
    records = [{"init": "random", "mode": "linear", "layers": k, "seed": s, "test_acc": acc}
               for k, s, acc in ((1, 0, 0.5), (1, 1, 0.7), (2, 0, 0.8), (2, 1, 0.8))]
    records.append({"init": "layerwise", "mode": "frozen", "layers": 2, "seed": 0, "test_acc": 0.9})
    lines = study_table.pivot(records).splitlines()
    assert lines[0] == "| init | mode | k=1 | k=2 | seeds |"
    assert lines[2:] == ["| layerwise | frozen | – | 90.0 | 1 |", "| random | linear | 60.0 ± 14.1 | 80.0 ± 0.0 | 2 |"]
