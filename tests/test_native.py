import contextlib
import pytest
import torch

from contrastive_lw import native
from contrastive_lw.augment import AugmentConfig, Augmentation, to_float
from contrastive_lw.data import load_dataset
from contrastive_lw.patches import PatchIndex, PatchSampler, crop


def kernel_or_skip():
    if native.cut_and_augment_kernel() is None:
        pytest.skip("no C compiler here: the PyTorch path is the one in use")


def sample_frames(channels: int = 3) -> torch.Tensor:
    images = load_dataset("sample", "train").images[:200, :channels]
    return images.contiguous(memory_format=torch.channels_last)


def positions(frames: torch.Tensor, size: int, n: int = 600) -> PatchIndex:
    views = PatchSampler(size, "exemplar", seed=0).sample_indices(frames.shape, n)
    return PatchIndex(*map(torch.cat, zip(*views[:2])))


@pytest.mark.parametrize("size", [7, 13])
@pytest.mark.parametrize("config", [
    AugmentConfig(), AugmentConfig(rotation_p=1.0, rotation_degrees=45, crop_scale=(0.2, 1.0)),
    AugmentConfig(jitter_p=0.0, grayscale_p=0.0), AugmentConfig(crop_scale=(1.0, 1.0), rotation_p=0.0),
    AugmentConfig(jitter_p=1.0, hue=0.5, grayscale_p=0.5)], ids=["default", "strong", "geometry", "colour", "hue"])
def test_kernel_gives_the_pytorch_path_values(config, size):
    """Same seed, same draws: the C kernel's crop + warp + colour equals crop -> to_float -> forward."""
    kernel_or_skip()
    frames, augment = sample_frames(), Augmentation(config)
    where = positions(frames, size)
    torch.manual_seed(3)
    expected = augment(to_float(crop(frames, where, size)))
    torch.manual_seed(3)
    got = augment.cut(frames, where, size)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)
    assert (got - to_float(crop(frames, where, size))).abs().mean() > 0.01  # it did augment


@pytest.mark.parametrize("channels", [1, 4])  # the packed pixel's first channel alone, and all four
def test_kernel_warps_images_of_other_channel_counts(channels):
    kernel_or_skip()
    frames = sample_frames()
    frames = torch.cat([frames, frames[:, :1]], 1) if channels == 4 else frames[:, :1]
    frames = frames.contiguous(memory_format=torch.channels_last)
    augment = Augmentation(AugmentConfig(), channels=channels)
    where = positions(frames, 7)
    torch.manual_seed(0)
    expected = augment(to_float(crop(frames, where, 7)))
    torch.manual_seed(0)
    torch.testing.assert_close(augment.cut(frames, where, 7), expected, atol=2e-5, rtol=0)


def test_positions_outside_the_images_are_refused_not_read():
    kernel_or_skip()
    frames = sample_frames()
    where = positions(frames, 7)
    with pytest.raises(ValueError, match="out of range"):
        Augmentation(AugmentConfig()).cut(frames, where._replace(left=where.left + 26), 7)
    with pytest.raises(ValueError, match="out of range"):
        Augmentation(AugmentConfig()).cut(frames, where._replace(image=where.image + len(frames)), 7)


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """The kernel looked up again, built into an empty cache."""
    monkeypatch.setenv("CONTRASTIVE_LW_CACHE", str(tmp_path))
    native.cut_and_augment_kernel.cache_clear()
    yield tmp_path
    native.cut_and_augment_kernel.cache_clear()


def test_without_a_compiler_the_pytorch_path_is_used_and_said(fresh_kernel, monkeypatch):
    monkeypatch.setenv("CC", str(fresh_kernel / "no-such-compiler"))
    with pytest.warns(RuntimeWarning, match="slower PyTorch path"):
        assert native.cut_and_augment_kernel() is None
    frames, augment = sample_frames(), Augmentation(AugmentConfig())
    where = positions(frames, 7)
    torch.manual_seed(1)
    expected = augment(to_float(crop(frames, where, 7)))
    torch.manual_seed(1)
    torch.testing.assert_close(augment.cut(frames, where, 7), expected)


def test_switched_off_by_environment(fresh_kernel, monkeypatch):
    monkeypatch.setenv("CONTRASTIVE_LW_NATIVE", "0")
    assert native.cut_and_augment_kernel() is None
    assert not list(fresh_kernel.iterdir())


def test_built_once_then_loaded_from_the_cache(fresh_kernel):
    kernel_or_skip()
    built = list(fresh_kernel.iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    native.cut_and_augment_kernel.cache_clear()
    assert native.cut_and_augment_kernel() is not None
    assert list(fresh_kernel.iterdir()) == built and built[0].stat().st_mtime_ns == stamp


def uniform_draws(seed: int, count: int) -> torch.Tensor:
    draws = torch.empty(count)
    native.uniform_kernel()(seed, count, draws.data_ptr())
    return draws


def test_uniform_kernel_draws_evenly_and_each_draw_depends_on_its_index_alone():
    if native.uniform_kernel() is None:
        pytest.skip("no C compiler here: the augmentation draws with torch.rand")
    draws = uniform_draws(12345, 100_000)
    assert 0 <= draws.min() and draws.max() < 1
    counts = torch.histc(draws, bins=20, min=0, max=1)
    assert ((counts - 5000).abs() < 5 * 5000 ** 0.5).all()  # each bin within 5 sigma of even
    assert abs(torch.corrcoef(torch.stack([draws[:-1], draws[1:]]))[0, 1]) < 0.02  # neighbours unrelated
    assert torch.equal(uniform_draws(12345, 1000), draws[:1000])  # the same whatever the threads' split
    assert not torch.equal(uniform_draws(12346, 1000), draws[:1000])


def test_augmentation_draws_repeat_with_the_global_seed_and_match_without_the_kernel():
    """Same seed, same draws with or without a compiler: the PyTorch splitmix64 equals the C kernel."""
    from contrastive_lw.augment import counter_uniform

    torch.manual_seed(5)
    first = Augmentation._draw(100, torch.device("cpu"))
    torch.manual_seed(5)
    assert torch.equal(Augmentation._draw(100, torch.device("cpu")), first)
    with native.pytorch_paths():
        torch.manual_seed(5)
        assert torch.equal(Augmentation._draw(100, torch.device("cpu")), first)
        in_pytorch = counter_uniform(2 ** 61 + 12345, 5000)
    if native.uniform_kernel() is not None:
        assert torch.equal(uniform_draws(2 ** 61 + 12345, 5000), in_pytorch)


def test_patches_and_a_short_run_agree_with_and_without_the_kernels(tmp_path, images):
    """One seed, CONTRASTIVE_LW_NATIVE=0 or 1: the augmented patches agree to 1e-5 and 50 steps of
    pretraining end at weights that agree to float rounding."""
    from contrastive_lw.model import ArchConfig
    from contrastive_lw.patches import PatchSampler
    from contrastive_lw.pretrain import LayerwisePretrainer, PretrainConfig, augmented_views

    kernel_or_skip()
    frames = images.contiguous(memory_format=torch.channels_last)
    sampler = PatchSampler(7, "adjacent", seed=3)
    where = list(sampler.sample_indices(frames.shape, 256, torch.device("cpu")))
    runs = {}
    for name, paths in {"native": contextlib.nullcontext(), "pytorch": native.pytorch_paths()}.items():
        with paths:
            torch.manual_seed(0)
            patches = augmented_views(frames, where, 7, Augmentation(AugmentConfig()))
            config = PretrainConfig(arch=ArchConfig(widths=(8,)), steps_per_layer=50, batch_size=64)
            runs[name] = patches, LayerwisePretrainer(config, tmp_path / name, "cpu", progress=False).fit(images)
    torch.testing.assert_close(runs["native"][0], runs["pytorch"][0], atol=1e-5, rtol=0)
    for a, b in zip(runs["native"][1].state_dict().values(), runs["pytorch"][1].state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
