import pytest
import torch

from contrastive_lw.checkpoint import save_backbone
from contrastive_lw.cli import main
from contrastive_lw.data import SAMPLE_DIR
from contrastive_lw.errors import DataError, UserError
from contrastive_lw.features import describe, export_features
from contrastive_lw.model import ArchConfig, LayerwiseNet
from contrastive_lw.search import SearchIndex, precision_at_k

ARCH = ArchConfig(widths=(4, 6))


def _index(images, net, backend="exact"):
    meta = describe(net, [1, 2], 2, image_size=[32, 32])
    return SearchIndex.build(export_features(net, images, [1, 2], 2, progress=False), None, meta, backend)


@pytest.mark.parametrize("backend", ["exact", "faiss"])
def test_an_image_finds_its_exact_duplicate_first(images, tmp_path, backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    torch.manual_seed(0)
    net = LayerwiseNet(ARCH)
    index = SearchIndex.load(_index(images, net, backend).save(tmp_path / "idx"))
    scores, neighbours = index.search_images(net, images[[5, 17]].clone(), top=3)
    assert neighbours[:, 0].tolist() == [5, 17] and torch.allclose(scores[:, 0], torch.ones(2), atol=1e-4)
    assert (scores[:, :-1] >= scores[:, 1:]).all()


def test_index_of_another_backbone_blocks_or_image_size_is_refused(images):
    torch.manual_seed(0)
    net, other = LayerwiseNet(ARCH), LayerwiseNet(ARCH)
    index = _index(images, net)
    with pytest.raises(UserError, match="another backbone"):
        index.search_images(other, images[:1])
    with pytest.raises(UserError, match="another layers"):
        index.check(describe(net, [2], 2))
    with pytest.raises(DataError, match="16x16"):
        index.search_images(net, images[:1, :, :16, :16])


def test_precision_at_k():
    labels = torch.arange(40) % 2
    features = torch.nn.functional.one_hot(labels, 4).float() + 0.01 * torch.randn(40, 4)
    assert precision_at_k(features, labels, k=10) == 1.0
    assert precision_at_k(torch.randn(400, 8), torch.arange(400) % 2, k=10) == pytest.approx(0.5, abs=0.1)


def test_search_commands_and_their_bad_inputs(tmp_path, capsys):
    from PIL import Image

    for name in ("a", "b"):
        torch.manual_seed(len(name) + ord(name))
        save_backbone(tmp_path / f"{name}.pt", LayerwiseNet(ARCH), "greedy")
    common = ["--dataset", "sample", "--classes", "0-1", "--limit", "20", "--no-progress", "--device", "cpu"]
    assert main(["search", "index", "--init", str(tmp_path / "a.pt"), "--layers", "1,2", "--out",
                 str(tmp_path / "idx"), *common]) == 0
    assert "precision@10" in capsys.readouterr().out
    query = sorted((SAMPLE_DIR / "test" / "airplane").iterdir())[0]
    assert main(["search", "query", str(query), "--index", str(tmp_path / "idx"), "--top", "4",
                 "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").stat().st_size > 0
    Image.open(query).convert("L").save(tmp_path / "grey.png")
    Image.open(query).resize((40, 40)).save(tmp_path / "big.png")
    bad = {"another": [str(query), "--init", str(tmp_path / "b.pt")], "channel": [str(tmp_path / "grey.png")],
           "40x40": [str(tmp_path / "big.png")]}
    for message, args in bad.items():
        capsys.readouterr()
        assert main(["search", "query", *args, "--index", str(tmp_path / "idx"), "--out", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
