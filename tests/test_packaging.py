"""What setup.py promises matches what the code needs."""
import re
from pathlib import Path

import torch

SETUP = (Path(__file__).parents[1] / "setup.py").read_text()


def _floor(package: str) -> tuple[int, ...]:
    found = re.search(rf'"{package}>=([\d.]+)"', SETUP)
    assert found, f"setup.py states no floor for {package}"
    return tuple(int(part) for part in found.group(1).split("."))


def test_torch_floor_covers_what_the_code_uses():
    """Fused AdamW on the CPU needs torch 2.4 and ``torch.OutOfMemoryError`` 2.5: the floor says so."""
    assert _floor("torch") >= (2, 5) and _floor("torchvision") >= (0, 20)
    assert hasattr(torch, "OutOfMemoryError")
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)], fused=True)
