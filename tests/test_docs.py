"""The docs point at things that exist."""
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_every_bad_input_row_names_tests_that_exist():
    """Each row of docs/BAD_INPUTS.md names a test (``file::name[case]``; ``...`` repeats the
    row's or the previous row's test name) that is defined, with its case, in that file."""
    rows = [line for line in (ROOT / "docs" / "BAD_INPUTS.md").read_text().splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) >= 35
    previous = None
    for row in rows:
        names = re.findall(r"`(test_\w+)::([\w.]+)(\[[\w-]+\])?", row.split("|")[-2])
        assert names, f"no test named in: {row}"
        for module, name, case in names:
            name = previous if name == "..." else name
            source = (ROOT / "tests" / f"{module}.py").read_text()
            assert f"def {name}(" in source, f"{module}::{name} does not exist ({row})"
            assert not case or f'"{case[1:-1]}"' in source, f"{module}::{name}{case} has no such case ({row})"
            previous = name
