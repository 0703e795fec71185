import pytest
import torch

from contrastive_lw.augment import AugmentConfig, build_augmentation
from contrastive_lw.data import load_dataset
from contrastive_lw.errors import ConfigError
from contrastive_lw.patches import PatchSampler, crop

OFF = dict(crop_scale=(1.0, 1.0), rotation_degrees=0.0, jitter=0.0, hue=0.0, grayscale_p=0.0)


def real_patches(n: int = 4096, size: int = 7) -> torch.Tensor:
    images = load_dataset("sample", "train").images[:500]
    where = PatchSampler(size, "exemplar", seed=0).sample_indices(images.shape, n)[0]
    return crop(images, where, size).float() / 255


def test_near_identity_draws_leave_patches_unchanged():
    """Exercises the warp and the colour matrix with (almost) no effect: catches transposed grids,
    off-by-half-pixel sampling and wrong colour matrices."""
    x = real_patches(256)
    warp = build_augmentation(AugmentConfig(**{**OFF, "rotation_degrees": 1e-6, "rotation_p": 1.0}))
    colour = build_augmentation(AugmentConfig(**{**OFF, "jitter": 1e-7, "jitter_p": 1.0}))
    torch.testing.assert_close(warp(x), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(colour(x), x, atol=1e-5, rtol=0)


def test_grayscale_gives_the_luma_of_each_pixel():
    x = real_patches(64)
    gray = build_augmentation(AugmentConfig(**{**OFF, "grayscale_p": 1.0}))(x)
    luma = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    torch.testing.assert_close(gray, luma.expand_as(x), atol=1e-5, rtol=0)


def test_hue_rotation_keeps_gray_pixels_gray_and_changes_colours():
    augment = build_augmentation(AugmentConfig(**{**OFF, "hue": 0.5, "jitter_p": 1.0}))
    gray = torch.rand(32, 1, 7, 7).expand(32, 3, 7, 7)
    torch.testing.assert_close(augment(gray), gray, atol=1e-5, rtol=0)
    x = real_patches(256)
    assert (augment(x) - x).abs().mean() > 0.01


def test_each_sample_gets_its_own_draw_and_seeds_repeat():
    augment = build_augmentation(AugmentConfig(rotation_p=1.0))  # by default a few draws are the identity
    x = real_patches(1)[:1].expand(64, 3, 7, 7)
    torch.manual_seed(0)
    first = augment(x)
    torch.manual_seed(0)
    again = augment(x)
    assert torch.equal(first, again)
    assert first.shape == x.shape and 0 <= first.min() and first.max() <= 1
    assert len({tuple(p.flatten().tolist()) for p in first}) == 64


def test_fused_draws_match_kornia_statistics():
    """The fast backend draws transforms of the same strength as kornia's reference pipeline:
    per-patch brightness, contrast and colour spread, and patch-to-patch pixel change."""
    x = real_patches()
    stats = {}
    for backend in ("fused", "kornia"):
        torch.manual_seed(0)
        y = build_augmentation(AugmentConfig(backend=backend))(x)
        stats[backend] = torch.stack([
            y.mean(), y.mean((1, 2, 3)).std(), y.std((2, 3)).mean(),
            (y - y.mean(1, keepdim=True)).abs().mean(), (y - x).abs().mean()])
    torch.testing.assert_close(stats["fused"], stats["kornia"], atol=0.015, rtol=0.1)


def test_grayscale_input_skips_colour_steps():
    augment = build_augmentation(AugmentConfig(**{**OFF, "hue": 0.5, "jitter": 0.4, "jitter_p": 1.0}), channels=1)
    x = torch.rand(8, 1, 7, 7)
    assert torch.equal(augment(x), x)


@pytest.mark.parametrize("values, message", [({"backend": "albumentations"}, "augment.backend"),
                                             ({"crop_scale": (0.0, 1.0)}, "augment.crop_scale"),
                                             ({"jitter_p": 1.5}, "augment.jitter_p")])
def test_unknown_backend_is_a_config_error(values, message):
    with pytest.raises(ConfigError, match=message):
        AugmentConfig(**values)
