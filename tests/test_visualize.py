import torch

from contrastive_lw.model import ArchConfig, LayerwiseNet
from contrastive_lw.visualize import maximize_activation


def _responses(net: LayerwiseNet, k: int, patches: torch.Tensor) -> torch.Tensor:
    """Mean pre-ReLU response of every channel of block k to each patch: patches x channels."""
    with torch.no_grad():
        features = net(patches, k - 1) if k > 1 else net.normalize(patches)
        return net.blocks[k - 1].pre_activation(features).mean(dim=(2, 3))


def test_each_patch_excites_its_own_unit_most():
    torch.manual_seed(0)
    net = LayerwiseNet(ArchConfig(widths=(8, 16)))
    net.train()
    for k in (1, 2):
        patches = maximize_activation(net, k, units=6, steps=60)
        size = net.receptive_field(k)
        assert patches.shape == (6, 3, size, size) and 0 <= patches.min() and patches.max() <= 1
        own = _responses(net, k, patches)[:, :6]
        random = _responses(net, k, torch.rand(64, 3, size, size))[:, :6]
        assert torch.equal(own.argmax(dim=0), torch.arange(6))        # patch c excites unit c most
        assert (own.diagonal() > random.amax(dim=0)).all()            # ... more than any random patch
    assert net.training  # the caller's mode is left as it was


def test_units_are_capped_at_the_block_width_and_runs_repeat():
    net = LayerwiseNet(ArchConfig(widths=(4,)))
    first = maximize_activation(net, 1, units=10, steps=5, seed=3)
    assert first.shape[0] == 4 and torch.equal(first, maximize_activation(net, 1, units=10, steps=5, seed=3))


def test_drawing_leaves_the_users_matplotlib_backend_alone(tmp_path):
    """A figure of the project never switches the process's backend (a notebook's plots keep theirs)."""
    import subprocess
    import sys

    code = ("import matplotlib, sys; matplotlib.use('svg');"
            "from contrastive_lw.visualize import save_curves;"
            f"save_curves({{'a': [0.5, 0.6]}}, {str(tmp_path / 'c.png')!r}, 't');"
            "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["svg", "False"]
    assert (tmp_path / "c.png").stat().st_size > 0
