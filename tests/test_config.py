"""Typed configs from plain dicts."""
from dataclasses import dataclass, field

import pytest

from contrastive_lw.config import from_dict, set_dotted
from contrastive_lw.errors import ConfigError


@dataclass(frozen=True)
class Inner:
    name: str = "triplet"
    margin: float = 0.5


@dataclass(frozen=True)
class Outer:
    inner: Inner = field(default_factory=lambda: Inner(name="infonce"))
    plain: Inner = field(default_factory=Inner)
    lr: float = 1e-3


def test_a_partial_nested_mapping_keeps_its_fields_default_not_the_class_default():
    """``inner: {margin: 0.2}`` changes the margin only: the name stays the field's default."""
    built = from_dict(Outer, {"inner": {"margin": 0.2}, "plain": {"margin": 0.1}})
    assert built.inner == Inner(name="infonce", margin=0.2)
    assert built.plain == Inner(name="triplet", margin=0.1)
    assert from_dict(Outer, {}) == Outer()


def test_the_bench_architecture_keeps_its_widths_when_another_arch_key_is_set():
    from contrastive_lw.bench import BenchConfig

    config = from_dict(BenchConfig, {"arch": {"kernel_sizes": [5, 3]}})
    assert config.arch.widths == BenchConfig().arch.widths and config.arch.kernel_sizes == (5, 3)


def test_set_dotted_builds_sections_and_refuses_bad_assignments():
    values = {"pretrain": {"lr": 0.1}}
    set_dotted(values, "pretrain.loss.temperature=0.2")
    set_dotted(values, "pretrain.arch.widths=[8, 16]")
    assert values == {"pretrain": {"lr": 0.1, "loss": {"temperature": 0.2}, "arch": {"widths": [8, 16]}}}
    for bad in ("pretrain.lr", "pretrain.lr.x=1", "=3", "a..b=1"):
        with pytest.raises(ConfigError):
            set_dotted(values, bad)
