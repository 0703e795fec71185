import pytest
import torch

from contrastive_lw import load_backbone
from contrastive_lw.checkpoint import BACKBONE, FORMAT_VERSION, load_checkpoint, save_checkpoint
from contrastive_lw.config import to_dict
from contrastive_lw.errors import CheckpointError
from contrastive_lw.model import ArchConfig, LayerwiseNet


def _backbone_file(path, arch=ArchConfig(), trained=3):
    net = LayerwiseNet(arch)
    save_checkpoint({"kind": BACKBONE, "arch": to_dict(arch), "trained_blocks": trained,
                     "backbone": net.state_dict()}, path)
    return net


def test_round_trip_and_format_version(tmp_path):
    net = _backbone_file(tmp_path / "layer3.pt")
    payload = load_checkpoint(tmp_path / "layer3.pt", BACKBONE)
    assert payload["format_version"] == FORMAT_VERSION
    loaded = load_backbone(tmp_path)
    assert loaded.receptive_field(3) == 21
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded(x), net(x))


def test_load_backbone_keeps_only_trained_blocks(tmp_path):
    _backbone_file(tmp_path / "layer2.pt", trained=2)
    assert load_backbone(tmp_path / "layer2.pt").num_blocks == 2


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    _backbone_file(tmp_path / "layer1.pt")
    before = (tmp_path / "layer1.pt").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint({"kind": BACKBONE}, tmp_path / "layer1.pt")
    assert (tmp_path / "layer1.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["layer1.pt"]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not_a_dict", "newer", "other_kind"])
def test_bad_checkpoints_get_one_clear_error(tmp_path, damage):
    path = tmp_path / "layer1.pt"
    _backbone_file(path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "garbage":
        path.write_text("hello")
    elif damage == "not_a_dict":
        torch.save([1, 2], path)
    elif damage == "newer":
        torch.save({"format_version": FORMAT_VERSION + 1, "kind": BACKBONE}, path)
    elif damage == "other_kind":
        save_checkpoint({"kind": "something-else"}, path)
    with pytest.raises(CheckpointError, match=str(path)):
        load_backbone(path)


def test_missing_checkpoint_and_empty_run_dir(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_backbone(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="pretrain first"):
        load_backbone(tmp_path)


def test_weights_of_another_architecture(tmp_path):
    path = tmp_path / "layer1.pt"
    net = LayerwiseNet(ArchConfig(widths=(8,)))
    save_checkpoint({"kind": BACKBONE, "arch": to_dict(ArchConfig(widths=(16,))), "trained_blocks": 1,
                     "backbone": net.state_dict()}, path)
    with pytest.raises(CheckpointError, match="do not match"):
        load_backbone(path)


def test_rng_state_holds_the_cuda_generator_on_a_cuda_device(monkeypatch):
    """Resumable loops (pretraining and transfer) save and restore the CUDA RNG beside the CPU's."""
    from contrastive_lw.checkpoint import restore_rng_state, rng_state

    cuda_state = {"now": torch.tensor([7], dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: cuda_state["now"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=None: cuda_state.update(now=state))
    saved = rng_state(torch.device("cuda"))
    assert torch.equal(saved["cuda_rng"], torch.tensor([7], dtype=torch.uint8))
    assert "cuda_rng" not in rng_state(torch.device("cpu"))
    expected = torch.rand(2)
    cuda_state["now"] = torch.tensor([9], dtype=torch.uint8)
    restore_rng_state(saved, torch.device("cuda"))
    assert torch.equal(cuda_state["now"], torch.tensor([7], dtype=torch.uint8))
    assert torch.equal(torch.rand(2), expected)


def test_a_checkpoint_of_format_1_keeps_loading():
    """A backbone file written by format 1 (committed; never regenerate it): later versions of the
    package must load it and compute the same features it did."""
    from pathlib import Path

    path = Path(__file__).parent / "fixtures" / "layer2_format1.pt"
    payload = load_checkpoint(path, BACKBONE)
    assert payload["format_version"] == 1
    net = load_backbone(path).eval()
    assert net.num_blocks == 2
    with torch.no_grad():
        torch.testing.assert_close(net(payload["fixture_input"]), payload["fixture_output"])
