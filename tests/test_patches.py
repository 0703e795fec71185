import pytest
import torch

from contrastive_lw.errors import ConfigError, DataError
from contrastive_lw.patches import PatchSampler, crop, PatchIndex

SHAPE = (50, 3, 32, 32)


def _indices(positive, size=7, seed=0, batch=4096, **kw):
    return PatchSampler(size, positive, seed=seed, **kw).sample_indices(SHAPE, batch)


def _in_bounds(where, size):
    return bool(((where.top >= 0) & (where.left >= 0) & (where.top + size <= 32) & (where.left + size <= 32)).all())


def test_adjacent_positive_touches_the_anchor_and_stays_in_bounds():
    anchor, positive, negative = _indices("adjacent")
    assert all(_in_bounds(w, 7) for w in (anchor, positive, negative))
    assert torch.equal(anchor.image, positive.image)
    dy, dx = positive.top - anchor.top, positive.left - anchor.left
    assert bool(((dy.abs() == 7) & (dx == 0) | (dx.abs() == 7) & (dy == 0)).all())
    # all four neighbours are used
    assert len(set(zip(dy.tolist(), dx.tolist()))) == 4


def test_shift_positive_overlaps_within_max_shift():
    anchor, positive, _ = _indices("shift", size=13, max_shift=3)
    dy, dx = positive.top - anchor.top, positive.left - anchor.left
    assert _in_bounds(positive, 13) and _in_bounds(anchor, 13)
    assert bool((dy.abs().maximum(dx.abs()) >= 1).all()) and int(dy.abs().max()) == 3


def test_exemplar_positive_is_the_same_patch():
    anchor, positive, _ = _indices("exemplar", size=25)
    assert all(torch.equal(a, p) for a, p in zip(anchor, positive))


def test_negative_comes_from_another_image():
    anchor, _, negative = _indices("adjacent")
    assert bool((anchor.image != negative.image).all())
    assert len(negative.image.unique()) == SHAPE[0]


@pytest.mark.parametrize("size", [7, 13])
def test_same_image_negative_is_a_non_overlapping_patch_of_the_anchors_image(size):
    anchor, _, negative = _indices("exemplar", size=size, negative="same_image")
    assert torch.equal(anchor.image, negative.image) and _in_bounds(negative, size)
    places = 32 - size + 1
    gap = min(size, places // 2)
    dy, dx = (negative.top - anchor.top).abs(), (negative.left - anchor.left).abs()
    assert bool((dy.maximum(dx) >= gap).all())  # never the anchor's own patch
    if size == 7:  # room enough: never overlapping
        assert bool((dy.maximum(dx) >= size).all())
    assert len(set(zip(negative.top.tolist(), negative.left.tolist()))) > places ** 2 // 2  # spread out


def test_unknown_negative_is_a_clear_error():
    with pytest.raises(ConfigError, match="negative must be one of"):
        PatchSampler(7, negative="elsewhere")


def test_patches_are_cut_where_the_indices_say():
    images = torch.arange(2 * 3 * 32 * 32).reshape(2, 3, 32, 32).to(torch.int64)
    where = PatchIndex(torch.tensor([1]), torch.tensor([4]), torch.tensor([9]))
    assert torch.equal(crop(images, where, 5)[0], images[1, :, 4:9, 9:14])


@pytest.mark.parametrize("size", [1, 5, 7, 10])
def test_channels_last_crop_equals_slicing_also_at_the_last_pixel(size):
    stack = torch.randint(0, 256, (7, 3, 10, 12), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    images = stack[2:]  # a view with a storage offset
    where = PatchSampler(size, "exemplar", seed=1).sample_indices(images.shape, 64)[0]
    where = PatchIndex(torch.cat([where.image, torch.tensor([4])]), torch.cat([where.top, torch.tensor([10 - size])]),
                       torch.cat([where.left, torch.tensor([12 - size])]))
    patches = crop(images, where, size)
    assert patches.is_contiguous(memory_format=torch.channels_last)
    for patch, i, top, left in zip(patches, *where):
        assert torch.equal(patch, images[i, :, top:top + size, left:left + size])


def test_sampler_shapes_dtype_and_determinism(images):
    a, p, n = PatchSampler(7, seed=3)(images, 16)
    assert a.shape == p.shape == n.shape == (16, 3, 7, 7) and a.dtype == torch.uint8
    again = PatchSampler(7, seed=3)(images, 16)
    assert torch.equal(a, again.anchor) and torch.equal(n, again.negative)
    assert not torch.equal(a, PatchSampler(7, seed=4)(images, 16).anchor)


def test_video_positive_is_the_same_place_in_the_last_frame():
    clips = torch.randint(0, 256, (6, 4, 3, 16, 16), dtype=torch.uint8)
    sampler = PatchSampler(5, seed=0)
    a, p, n = sampler.sample_video(clips, 32)
    gen = PatchSampler(5, seed=0)
    anchor, _, _ = gen.sample_indices((6, 3, 16, 16), 32, positive="exemplar")
    for i in range(32):
        c, y, x = int(anchor.image[i]), int(anchor.top[i]), int(anchor.left[i])
        assert torch.equal(a[i], clips[c, 0, :, y:y + 5, x:x + 5])
        assert torch.equal(p[i], clips[c, -1, :, y:y + 5, x:x + 5])
    with pytest.raises(DataError, match="N x T x C x H x W"):
        sampler.sample_video(clips[0], 4)


def test_patch_larger_than_images_is_a_clear_error():
    with pytest.raises(ConfigError, match="larger than the 32x32 images"):
        PatchSampler(33, "exemplar").sample_indices(SHAPE, 4)
    with pytest.raises(ConfigError, match="use positive 'shift' or 'exemplar'"):
        PatchSampler(25, "adjacent").sample_indices(SHAPE, 4)
    with pytest.raises(DataError, match="at least 2 images"):
        PatchSampler(7).sample_indices((1, 3, 32, 32), 4)
    with pytest.raises(ConfigError):
        PatchSampler(7, "neighbour")


@pytest.mark.parametrize("positive", ["adjacent", "shift", "exemplar"])
def test_anchors_take_every_place_where_their_pair_fits_in_non_square_images(positive):
    shape, size = (20, 3, 24, 40), 7
    anchor, pos, negative = PatchSampler(size, positive, seed=0).sample_indices(shape, 20000)
    dy, dx = pos.top - anchor.top, pos.left - anchor.left
    for offset in set(zip(dy.tolist(), dx.tolist())):
        mine = (dy == offset[0]) & (dx == offset[1])
        for start, step, side in ((anchor.top, offset[0], 24), (anchor.left, offset[1], 40)):
            # the lowest and highest starts that keep both patches inside the image
            assert int(start[mine].min()) == max(0, -step) and int(start[mine].max()) == side - size - max(0, step)
    assert (int(negative.top.max()), int(negative.left.max())) == (24 - size, 40 - size)
    assert min(int(negative.top.min()), int(negative.left.min())) == 0
