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


def test_class_image_raises_its_logit():
    from contrastive_lw.heads import Classifier
    from contrastive_lw.visualize import class_images

    torch.manual_seed(0)
    model = Classifier(LayerwiseNet(ArchConfig(widths=(4,))), num_classes=3, new_widths=(8,), hidden=0,
                       image_size=16)
    start = class_images(model, [0, 2], size=16, steps=0)                     # the faint-noise start
    ideal = class_images(model, [0, 2], size=16, steps=30)
    assert ideal.shape == (2, 3, 16, 16) and 0 <= ideal.min() and ideal.max() <= 1
    with torch.no_grad():
        before, after = model.eval()(start)[:, [0, 2]].diagonal(), model(ideal)[:, [0, 2]].diagonal()
    assert (after > before).all()
    rough, smooth = (class_images(model, [0], size=16, steps=30, tv=tv) for tv in (0.0, 5.0))
    variation = [x.diff(dim=-1).abs().mean() + x.diff(dim=-2).abs().mean() for x in (rough, smooth)]
    assert variation[1] < variation[0]                                        # the TV penalty smooths it


def test_image_table(tmp_path):
    from contrastive_lw.visualize import save_image_table

    rows = [[torch.rand(3, 8, 8), torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)], [torch.rand(1, 8, 8)]]
    path = save_image_table(rows, tmp_path / "t.png", [["a", "b"], ["c"]], ["r1", "r2"], "title")
    assert path.stat().st_size > 0


def test_visualize_draws_the_class_images_of_transfer_runs(tmp_path):
    from contrastive_lw.cli import main

    runs = [str(tmp_path / name) for name in ("a", "b")]
    for run, mode in zip(runs, ("finetune", "linear")):
        assert main(["transfer", "--init", "random", "--dataset", "sample", "--classes", "0-2", "--limit", "30",
                     "--layers", "1", "--mode", mode, "--epochs", "1", "--out", run, "--no-progress",
                     "--device", "cpu"]) == 0
    assert main(["visualize", *runs, "--steps", "3", "--out", str(tmp_path / "classes.png")]) == 0
    assert (tmp_path / "classes.png").stat().st_size > 1000


def test_filter_figure_carries_its_caption_below_the_grids(tmp_path):
    from PIL import Image

    from contrastive_lw.visualize import save_filter_grids

    weights = {"a block 1": torch.randn(8, 3, 6, 6), "b block 1": torch.randn(8, 3, 6, 6)}
    plain = Image.open(save_filter_grids(weights, tmp_path / "plain.png"))
    captioned = Image.open(save_filter_grids(weights, tmp_path / "captioned.png", "same initialisation"))
    assert captioned.width == plain.width and captioned.height > plain.height
    bottom = torch.tensor(list(captioned.convert("L").crop((0, captioned.height - 40, captioned.width,
                                                            captioned.height)).getdata()))
    assert (bottom < 128).any()  # the caption's text is drawn there
