import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from contrastive_lw.accel import native
from contrastive_lw.errors import ConfigError
from contrastive_lw.accel.conv import Conv2d
from contrastive_lw.heads import Classifier, ProjectionHead
from contrastive_lw.model import ArchConfig, ConvBlock, LayerwiseNet


def test_default_receptive_fields_and_block_3_unpooled():
    net = LayerwiseNet()
    assert [net.receptive_field(k) for k in (1, 2, 3)] == [7, 13, 21]
    assert [net.output_size(net.receptive_field(k), k) for k in (1, 2, 3)] == [1, 1, 1]
    assert net.output_size(32) == 3  # block 3 keeps a 3x3 map of a 32x32 image
    seed = LayerwiseNet(ArchConfig(pools=(2,)))  # the seed's pooled block 3 leaves 1x1 of it
    assert seed.receptive_field(3) == 25 and seed.output_size(32) == 1


def test_ten_pixel_variant_and_pooling_ablation():
    # conv 9x9 + pool 2 sees 10x10; block 1 without pooling sees only its kernel
    assert LayerwiseNet(ArchConfig(widths=(8,), kernel_sizes=(9,))).receptive_field(1) == 10
    no_pool = LayerwiseNet(ArchConfig(widths=(8, 8), pools=(1, 2)))
    assert no_pool.receptive_field(1) == 6
    assert no_pool.receptive_field(2) == 6 + 2 + 1
    assert ArchConfig().without_first_pool().pools == (1, 2, 1)
    assert ArchConfig(widths=(8, 8), pools=(2,)).without_first_pool().pools == (1, 2)  # block 2 keeps the pool


def test_forward_shapes_and_prefix_shares_weights():
    net = LayerwiseNet()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert net(x).shape == (2, 256, 3, 3)  # block 3 unpooled
    assert net(x, 1).shape == (2, 64, 13, 13)
    prefix = net.prefix(2)
    assert prefix.num_blocks == 2 and prefix.blocks[0] is net.blocks[0]
    assert torch.equal(prefix(x), net(x, 2))


def test_upper_blocks_use_batch_norm_by_default():
    net = LayerwiseNet()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.blocks[0])
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.blocks[1])


def test_normalization_from_images():
    net = LayerwiseNet()
    images = torch.full((4, 3, 8, 8), 51, dtype=torch.uint8)
    images[:, 1] = 102
    net.set_normalization(images)
    assert torch.allclose(net.mean, torch.tensor([0.2, 0.4, 0.2]))


def test_normalize_is_per_channel_standardisation_for_uint8_and_float_input():
    net = LayerwiseNet()
    net.mean.copy_(torch.tensor([0.4, 0.5, 0.6]))
    net.std.copy_(torch.tensor([0.2, 0.25, 0.3]))
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    expected = (images.float() / 255 - net.mean.view(1, 3, 1, 1)) / net.std.view(1, 3, 1, 1)
    torch.testing.assert_close(net.normalize(images), expected)
    torch.testing.assert_close(net.normalize(images.float() / 255), expected)
    # laid out for the convolutions, whatever the input's layout (2x on the block features)
    assert net.normalize(images).is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(net(images.contiguous(memory_format=torch.channels_last), 1), net(images, 1))


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "crop", "uint8"])
def test_normalize_kernel_gives_the_pytorch_paths_values_exactly(monkeypatch, layout):
    if native.normalize_kernel() is None:
        pytest.skip("no C compiler here: the PyTorch path is the one in use")
    net = LayerwiseNet()
    net.mean.copy_(torch.tensor([0.4, 0.5, 0.6]))
    net.std.copy_(torch.tensor([0.2, 0.25, 0.3]))
    images = torch.rand(5, 3, 11, 9)
    images[1, 2, 3, 4] = float("nan")
    images = {"nchw": images, "channels_last": images.contiguous(memory_format=torch.channels_last),
              "crop": images[:, :, 2:9, 1:8], "uint8": (images.nan_to_num() * 255).to(torch.uint8)}[layout]
    got = net.normalize(images)
    monkeypatch.setattr(native, "normalize_kernel", lambda: None)
    expected = net.normalize(images)
    assert got.is_contiguous(memory_format=torch.channels_last) and got.shape == images.shape
    assert torch.equal(got.nan_to_num(7.0), expected.nan_to_num(7.0))  # the same float32 operations
    assert torch.isnan(got).sum() == (layout != "uint8")  # a NaN pixel stays NaN


def test_normalize_keeps_the_gradient_of_an_input_that_wants_one():
    x = torch.rand(2, 3, 7, 7, requires_grad=True)
    LayerwiseNet().normalize(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 4.0))  # 1 / std, std 0.25


def test_projection_head():
    assert ProjectionHead(64, 16)(torch.rand(3, 64, 1, 1)).shape == (3, 16)
    assert ProjectionHead(64 * 4, 16, hidden=32)(torch.rand(3, 64, 2, 2)).shape == (3, 16)


def test_output_basis_of_a_widening_linear_head_spans_its_outputs():
    torch.manual_seed(0)
    head = ProjectionHead(8, 32)
    basis = head.output_basis()
    assert basis.shape == (32, 9) and not basis.requires_grad
    torch.testing.assert_close(basis.T @ basis, torch.eye(9), atol=1e-5, rtol=0)
    z = head(torch.randn(50, 8, 1, 1))
    torch.testing.assert_close(z @ basis @ basis.T, z, atol=1e-5, rtol=1e-5)  # outputs lie in the space
    # no smaller space: as wide as its input + bias, or a hidden layer (Linear -> BN -> ReLU -> Linear)
    assert ProjectionHead(31, 32).output_basis() is None and ProjectionHead(8, 32, hidden=4).output_basis() is None


@pytest.mark.parametrize("bad", [dict(widths=()), dict(widths=(0,)), dict(kernel_sizes=(-1,)), dict(pools=(0,)),
                                 dict(paddings=(0, 3)), dict(paddings=(-1,)), dict(paddings=())])
def test_bad_arch_is_rejected(bad):
    with pytest.raises(ConfigError):
        ArchConfig(**bad)


def test_padding_keeps_a_larger_map_and_the_receptive_fields():
    plain, padded = LayerwiseNet(), LayerwiseNet(ArchConfig(paddings=(0, 1)))
    assert [padded.receptive_field(k) for k in (1, 2, 3)] == [plain.receptive_field(k) for k in (1, 2, 3)]
    assert plain.blocks[1].conv.padding == (0, 0) and padded.blocks[1].conv.padding == (1, 1)
    for side in (13, 25, 32):  # output_size matches the forward pass, block by block
        x = torch.rand(2, 3, side, side)
        assert [padded(x, k).shape[-1] for k in (1, 2, 3)] == [padded.output_size(side, k) for k in (1, 2, 3)]
    assert [padded.output_size(32, k) for k in (1, 2, 3)] == [13, 6, 6]
    assert [plain.output_size(32, k) for k in (1, 2, 3)] == [13, 5, 3]
    # a unit of block 2 away from the border sees exactly its receptive field: change a pixel outside
    # the 13x13 window of output (1, 1) of a 32x32 image and that unit does not move
    padded.eval()
    x = torch.rand(1, 3, 32, 32)
    y = x.clone()
    y[..., 20:, :] = 0
    torch.testing.assert_close(padded(x, 2)[..., 1, 1], padded(y, 2)[..., 1, 1])


def test_block_index_out_of_range():
    with pytest.raises(ConfigError, match="out of range"):
        LayerwiseNet().receptive_field(4)


@pytest.mark.parametrize("in_ch, out_ch, kernel, side, bias", [(3, 8, 6, 7, True), (16, 8, 3, 4, False),
                                                                 (4, 8, 5, 5, True), (2, 4, 3, 3, True)])
def test_conv_as_one_matmul_equals_the_convolution(in_ch, out_ch, kernel, side, bias):
    torch.manual_seed(0)
    conv = Conv2d(in_ch, out_ch, kernel, bias=bias)
    x = torch.randn(5, in_ch, side, side).contiguous(memory_format=torch.channels_last)[1:]  # storage offset
    assert conv._as_matmul(x)
    grad = torch.randn(4, out_ch, side - kernel + 1, side - kernel + 1)
    results = []
    for forward in (conv._im2col_forward, super(Conv2d, conv).forward):
        conv.zero_grad()
        y = forward(x)
        y.backward(grad)
        results.append((y.detach(), *(p.grad for p in conv.parameters())))
    for matmul, reference in zip(*results):
        torch.testing.assert_close(matmul, reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(conv._im2col_forward(x.contiguous()), results[1][0], rtol=1e-4, atol=1e-5)


def test_conv_runs_as_matmul_only_while_training_on_inputs_of_at_most_2x2_outputs_on_the_cpu():
    conv = Conv2d(3, 8, 6)
    patch = torch.rand(2, 3, 7, 7)
    assert conv._as_matmul(patch)
    assert not conv._as_matmul(torch.rand(2, 3, 32, 32))       # larger outputs: oneDNN is faster
    assert not conv._as_matmul(torch.rand(2, 3, 8, 8))
    assert not conv._as_matmul(torch.rand(2, 3, 5, 5))         # smaller than the kernel: conv's error
    assert not conv._as_matmul(patch.to("meta"))
    assert not conv._as_matmul(patch.clone().requires_grad_())  # end-to-end: the input needs a gradient
    with torch.no_grad():
        assert not conv._as_matmul(patch)
    conv.matmul_path = False
    assert not conv._as_matmul(patch)
    conv.matmul_path = True
    conv.requires_grad_(False)
    assert not conv._as_matmul(patch)


def test_matmul_path_counts_the_convolutions_flops(monkeypatch):
    block, patch = LayerwiseNet().blocks[0], torch.rand(6, 3, 7, 7)

    def counted() -> int:
        with native.pytorch_paths(), FlopCounterMode(display=False) as counter:  # as the bench counts
            block(patch).sum().backward()
        return counter.get_total_flops()
    on_matmul_path = counted()
    monkeypatch.setattr(Conv2d, "matmul_path", False)
    assert on_matmul_path == counted() > 0  # the bench's GFLOP/s need no correction


def test_pytorch_paths_switch_the_kernels_off_within_the_block_only():
    loaders = {name: getattr(native, name) for name in native.LOADERS}
    with native.pytorch_paths():
        assert all(getattr(native, name)() is None for name in native.LOADERS)
    assert {name: getattr(native, name) for name in native.LOADERS} == loaders


@pytest.mark.parametrize("pool, side, fused", [(2, 7, True), (1, 7, False), (1, 6, True)])
@pytest.mark.parametrize("flat", [False, True])
def test_block_gives_the_same_output_and_gradients_on_both_convolution_paths(pool, side, fused, flat):
    torch.manual_seed(0)
    block = ConvBlock(3, 8, 6, pool=pool)
    assert block[1].inplace  # the ReLU: in place, except on the matmul path's view
    # flat patches: all four windows equal, so the max ties (the gradient goes to one position only)
    patch = torch.rand(4, 3, 1, 1).expand(4, 3, side, side).contiguous() if flat else torch.rand(4, 3, side, side)
    assert block._fused(patch) == fused  # conv + ReLU + a pool over the whole conv output: one matmul
    assert not ConvBlock(3, 8, 6, pool=pool, batch_norm=True)._fused(patch)  # BatchNorm sits before the max
    results = []
    for matmul in (True, False):
        block.conv.matmul_path = matmul
        block.zero_grad()
        out = block(patch)
        (out * torch.arange(out[0].numel()).view_as(out[0])).square().sum().backward()
        results.append((out.detach(), block.conv.weight.grad, block.conv.bias.grad))
    assert (results[0][0] == 0).any() and (results[0][0] > 0).any()  # both sides of the ReLU
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def fused_block_results(block: ConvBlock, patch: torch.Tensor) -> tuple[torch.Tensor, ...]:
    block.zero_grad()
    out = block(patch)
    n, channels = out.shape[:2]
    every_other = torch.randn(n, 2 * channels, generator=torch.Generator().manual_seed(0))[:, ::2]
    every_other[3:20] = every_other[30] = 0  # patches with no gradient at all (triplets within the margin)
    out.backward(every_other.view_as(out))  # a gradient that is not contiguous
    return out.detach(), block.conv.weight.grad.clone(), block.conv.bias.grad.clone()


# 6 x 6 x 3 = 108 columns of the weight: vectors and an overlapping last one; 2 x 2 x 3: under one vector
@pytest.mark.parametrize("kernel", [6, 2])
def test_max_pool_relu_kernels_give_the_pytorch_paths_output_and_gradients(monkeypatch, kernel):
    if native.max_pool_relu_kernels() is None:
        pytest.skip("no C compiler here: the PyTorch path is the one in use")
    torch.manual_seed(0)
    block, side = ConvBlock(3, 16, kernel, pool=2), kernel + 1
    flat = torch.rand(8, 3, 1, 1).expand(8, 3, side, side)  # all four windows equal: the max ties
    # 61 patches: the backward's last group of eight is short
    patch = torch.cat([torch.rand(53, 3, side, side), flat]).contiguous(memory_format=torch.channels_last)
    assert block._fused(patch)
    got = fused_block_results(block, patch)
    monkeypatch.setattr(native, "max_pool_relu_kernels", lambda: None)
    expected = fused_block_results(block, patch)
    assert torch.equal(got[0], expected[0])  # the same max, sum and ReLU: the same float32 values
    for a, b in zip(got[1:], expected[1:]):  # the gradients: the same terms summed in another order
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    assert (got[0] == 0).any() and (got[0] > 0).any()


def test_max_pool_relu_kernel_keeps_a_nan_visible():
    block, patch = ConvBlock(3, 16, 6, pool=2), torch.rand(4, 3, 7, 7)
    patch[2, 1, 3, 3] = float("nan")  # every window holds it
    out = block(patch)
    assert torch.isnan(out[2]).all() and torch.isfinite(out[[0, 1, 3]]).all()
    out.sum().backward()
    assert torch.isnan(block.conv.weight.grad).all() and torch.isnan(block.conv.bias.grad).all()


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("pool", [1, 2])
def test_block_pooling_before_its_relu_gives_the_relu_then_pool_output_and_gradients(batch_norm, pool):
    torch.manual_seed(0)
    block = ConvBlock(3, 8, 3, pool=pool, batch_norm=batch_norm).double()
    x = torch.randn(4, 3, 9, 9, dtype=torch.float64)
    results = []
    for forward in (ConvBlock.forward, torch.nn.Sequential.forward):  # the modules' order: conv, [BN], ReLU, pool
        block.zero_grad()
        out = forward(block, x)
        (out * torch.arange(out[0].numel()).view_as(out[0])).square().sum().backward()
        results.append((out.detach(), *(p.grad.clone() for p in block.parameters())))
    assert (results[0][0] == 0).any() and (results[0][0] > 0).any()  # both sides of the ReLU
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_classifier_new_blocks_pool_before_their_relu_with_the_relu_then_pool_output():
    torch.manual_seed(0)
    clf = Classifier(LayerwiseNet(ArchConfig(widths=(8,))), num_classes=3, new_widths=(6, 5), hidden=0).double().eval()
    x = clf.backbone(torch.rand(2, 3, 32, 32, dtype=torch.float64))
    expected = x
    for conv, norm, pool, relu in clf.new_blocks:
        assert isinstance(pool, torch.nn.MaxPool2d) and isinstance(relu, torch.nn.ReLU)
        expected = pool(torch.relu(norm(conv(expected))))
    torch.testing.assert_close(clf.new_blocks(x), expected, rtol=1e-12, atol=1e-12)


def test_supervised_baseline_and_layerwise_pretraining_start_from_the_same_network(tmp_path, monkeypatch):
    from contrastive_lw import supervised
    from contrastive_lw.data import ImageData
    from contrastive_lw.model import INIT_SCALE, initial_network
    from contrastive_lw.pretrain import LayerwisePretrainer, PretrainConfig
    from contrastive_lw.transfer import TransferConfig

    arch = ArchConfig(widths=(4, 6))
    images = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8)
    layerwise = LayerwisePretrainer(PretrainConfig(arch=arch, seed=3), tmp_path / "lw", "cpu",
                                    tensorboard=False).initial_network(images)
    started = []
    real = supervised.train_transfer
    monkeypatch.setattr(supervised, "train_transfer", lambda net, *a, **kw: started.append(
        {k: v.clone() for k, v in net.state_dict().items()}) or real(net, *a, **kw))
    data = ImageData(images, torch.arange(32) % 2, ["a", "b"])
    supervised.train_supervised(data, data, arch, TransferConfig(epochs=1, batch_size=16, new_widths=(), hidden=0, seed=3),
                                tmp_path / "sup", "cpu", tensorboard=False)
    for name, value in layerwise.state_dict().items():
        torch.testing.assert_close(started[0][name], value, rtol=0, atol=0)
    torch.manual_seed(3)
    drawn = LayerwiseNet(arch).blocks[0].conv.weight
    torch.testing.assert_close(layerwise.blocks[0].conv.weight, INIT_SCALE * drawn)
    assert torch.equal(initial_network(arch, images, 3, 1.0).blocks[0].conv.weight, drawn)
