"""Advice on how to transfer a pretrained backbone to a target: the fit measures of
:mod:`contrastive_lw.fit` mapped to the knobs of the non-binary fine-tune (Plested, Shen & Gedeon
2021, arXiv 2107.08585) by a documented, tunable rule table, and an optional successive-halving
search around the advice on a held-out split of the target's training set."""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from .config import from_dict, to_dict
from .data import ImageData
from .errors import ConfigError
from .fit import BlockFit
from .transfer import TransferConfig, train_transfer

MODES = ("frozen", "finetune", "head2toe")


@dataclass(frozen=True)
class AdviceRules:
    """The mapping from fit measures to settings (``experiments/configs/advise_rules.yaml`` spells
    out the defaults; pass your own with ``advise --rules FILE``). ``gain`` is a block's
    ``gain_measure`` accuracy (``knn`` or ``linear``) minus the random-weight network's, on held-out
    images; it *counts* when it is at least ``min_gain`` and more than ``gain_se`` standard errors
    (:meth:`~contrastive_lw.fit.BlockFit.gain_se`: on 200 held-out images an accuracy near 50% has an
    s.e. of 3.5 points, and two random networks differed by 4.5 kNN points, docs/STUDY.md). kNN is the
    default measure: a linear probe on a wide random block is already strong (block 1's probe 67%
    pretrained and random alike, docs/STUDY.md).

    * layers: among the blocks whose gain counts, the one with the best ``depth_measure``
      (``linear``, ``knn`` or ``logme``; ties go to the deeper); none: the pretrained weights are no
      better than random ones, so 1 block is transferred, the blocks above it are re-initialised and
      everything trains at the head's rate (training from scratch at the backbone's full depth);
    * reinit: with ``reinit_rest``, the blocks above k are kept in place and re-initialised (the
      non-binary paper's way; always when nothing fits);
    * mode: ``head2toe`` when Head2Toe keeps a shallower block's features at ``head2toe_ratio`` x the
      rate of block k's (the useful features lie below k); else ``frozen`` when the fit is strong
      (the gain counts and is >= ``strong_gain``) and the target has at most
      ``frozen_max_per_class`` training images a class; else ``finetune``;
    * lr_ratios: head 1, re-initialised ``reinit_lr_ratio``, transferred ``lr_ratio_strong`` /
      ``lr_ratio_weak`` / ``lr_ratio_none`` for a strong / weak (counts) / no fit;
    * l2sp: ``l2sp_strong`` / ``l2sp_weak`` / 0 likewise (0 when frozen: nothing moves);
    * l2: ``l2`` on the head and re-initialised blocks (the paper code's 0.0005).
    """

    gain_measure: str = "knn"
    gain_se: float = 2.0
    min_gain: float = 0.02
    strong_gain: float = 0.10
    depth_measure: str = "linear"
    reinit_rest: bool = True
    head2toe_ratio: float = 2.0
    frozen_max_per_class: int = 100
    reinit_lr_ratio: float = 1.0
    lr_ratio_strong: float = 0.1
    lr_ratio_weak: float = 0.5
    lr_ratio_none: float = 1.0
    l2sp_strong: float = 0.01
    l2sp_weak: float = 0.001
    l2: float = 5e-4

    def __post_init__(self) -> None:
        if self.gain_measure not in ("linear", "knn"):
            raise ConfigError(f"rules.gain_measure must be linear or knn, got {self.gain_measure!r}")
        if self.depth_measure not in ("linear", "knn", "logme"):
            raise ConfigError(f"rules.depth_measure must be linear, knn or logme, got {self.depth_measure!r}")
        if not 0 <= self.min_gain <= self.strong_gain:
            raise ConfigError("rules: need 0 <= min_gain <= strong_gain")
        if self.gain_se < 0:
            raise ConfigError(f"rules.gain_se must be >= 0 standard errors, got {self.gain_se}")

    @classmethod
    def from_dict(cls, values: dict) -> AdviceRules:
        return from_dict(cls, values, "advice rules")


@dataclass
class Recommendation:
    """Settings for :class:`~contrastive_lw.transfer.TransferConfig` with a one-line reason each."""

    layers: int
    mode: str
    reinit: int
    lr_ratios: dict[str, float]
    l2sp: float
    l2: float
    reasons: dict[str, str] = field(default_factory=dict)

    def transfer_values(self) -> dict:
        """The :class:`TransferConfig` fields this recommendation sets."""
        return {"layers": self.layers, "mode": self.mode, "reinit": self.reinit,
                "layer_lr_ratio": self.lr_ratios["transferred"], "reinit_lr_ratio": self.lr_ratios["reinit"],
                "l2sp": self.l2sp, "l2": self.l2}

    def to_json(self) -> dict:
        keys = ("layers", "mode", "reinit", "lr_ratios", "l2sp", "l2")
        return {k: {"value": getattr(self, k), "reason": self.reasons.get(k, "")} for k in keys}

    @classmethod
    def from_json(cls, values: dict) -> Recommendation:
        try:
            return cls(**{k: v["value"] for k, v in values.items()}, reasons={k: v["reason"] for k, v in values.items()})
        except (TypeError, KeyError) as err:
            raise ConfigError(f"not a recommendation (keys layers, mode, reinit, lr_ratios, l2sp, l2, each with "
                              f"value and reason): {err}") from None

    def key(self) -> tuple:
        return self.layers, self.mode, self.reinit, self.lr_ratios["transferred"], self.l2sp


def recommend(table: list[BlockFit], per_class: float, rules: AdviceRules | None = None) -> Recommendation:
    """Apply ``rules`` to the fit ``table`` of blocks 1..K of a target with ``per_class`` training
    images a class."""
    rules = rules or AdviceRules()
    depth = len(table)
    measure = rules.gain_measure
    counted = [r for r in table if _counts(r, rules)]
    gate = (f"{measure} accuracy beats random weights by >= {100 * rules.min_gain:g} points and > "
            f"{rules.gain_se:g} s.e.")
    reasons = {}
    if counted:
        best = max(counted, key=lambda r: (getattr(r, rules.depth_measure), r.block))
        k = best.block
        reasons["layers"] = (f"block {k} has the best {rules.depth_measure} score ({_score(best, rules.depth_measure)}) "
                             f"of the {len(counted)} block(s) whose {gate} (block {k}: {_gain(best, measure)})")
    else:
        best = max(table, key=lambda r: r.gain_z(measure))
        k = 1
        reasons["layers"] = (f"no block's {gate} (best: block {best.block}, {_gain(best, measure)}): the pretrained "
                             "weights count as random ones; transfer 1 block and train the rest from scratch")
    gain = best.gain(measure)
    fit = "none" if not counted else "strong" if gain >= rules.strong_gain - 1e-9 else "weak"
    said = f"{fit} fit of block {k} ({_gain(best, measure)})" if counted else "no fit"
    below = [r.head2toe_kept for r in table[: k - 1]]
    spread = max(below, default=0.0)
    own = table[k - 1].head2toe_kept
    if below and spread >= rules.head2toe_ratio * max(own, 1e-9):
        mode = "head2toe"
        reasons["mode"] = (f"Head2Toe keeps {100 * spread:.0f}% of a shallower block's features vs {100 * own:.0f}% of "
                           f"block {k}'s (>= x{rules.head2toe_ratio}): read features from every depth")
    elif fit == "strong" and per_class <= rules.frozen_max_per_class:
        mode = "frozen"
        reasons["mode"] = (f"{said} and {per_class:.0f} <= {rules.frozen_max_per_class} images a class: keep the "
                           "transferred blocks fixed")
    else:
        mode = "finetune"
        reasons["mode"] = f"{said} with {per_class:.0f} images a class: fine-tune, the transferred blocks at their own rate"
    reinit = depth - k if (rules.reinit_rest or fit == "none") and mode != "head2toe" else 0
    reasons["reinit"] = (f"the {reinit} block(s) above {k} stay, re-initialised ("
                         + ("no fit: keep the backbone's depth" if fit == "none" else "rules.reinit_rest") + ")"
                         if reinit else "the blocks above k are dropped (rules.reinit_rest off, head2toe, or none above)")
    transferred = {"strong": rules.lr_ratio_strong, "weak": rules.lr_ratio_weak, "none": rules.lr_ratio_none}[fit]
    lr_ratios = {"head": 1.0, "reinit": rules.reinit_lr_ratio, "transferred": transferred}
    reasons["lr_ratios"] = (f"{said}: transferred blocks at x{transferred} the head's rate, re-initialised at "
                            f"x{rules.reinit_lr_ratio}")
    l2sp = 0.0 if mode != "finetune" else {"strong": rules.l2sp_strong, "weak": rules.l2sp_weak, "none": 0.0}[fit]
    reasons["l2sp"] = ("no L2-SP: the transferred blocks do not move" if mode != "finetune" else
                       f"{said}: L2-SP {l2sp:g} towards the pretrained weights")
    reasons["l2"] = f"plain L2 {rules.l2:g} on the head and re-initialised blocks (rules.l2; the paper code's 0.0005)"
    return Recommendation(k, mode, reinit, lr_ratios, l2sp, rules.l2, reasons)


def _counts(row: BlockFit, rules: AdviceRules) -> bool:
    """Whether ``row``'s gain clears both gates of ``rules`` (slack: 0.69 - 0.67 < 0.02 in floats)."""
    gain = row.gain(rules.gain_measure)
    return gain >= rules.min_gain - 1e-9 and gain > rules.gain_se * row.gain_se(rules.gain_measure)


def _gain(row: BlockFit, measure: str) -> str:
    return (f"{100 * row.gain(measure):+.1f} points = {row.gain_z(measure):+.1f} s.e. of "
            f"{100 * row.gain_se(measure):.1f} on {row.held_out} held-out images")


def _score(row: BlockFit, measure: str) -> str:
    value = getattr(row, measure)
    return f"{value:.3f}" if measure == "logme" else f"{100 * value:.1f}%"


def neighbours(rec: Recommendation, depth: int) -> list[Recommendation]:
    """Settings around ``rec``: k - 1 .. k + 1, frozen or fine-tuned, the transferred LR ratio / 3
    and x 3 (at most 1), L2-SP off / / 10 / x 10, no re-initialised blocks or all above k."""
    ratio = rec.lr_ratios["transferred"]
    out = []
    for k, mode, r, l2sp, reinit in itertools.product(
            range(max(1, rec.layers - 1), min(depth, rec.layers + 1) + 1),
            sorted({rec.mode, "finetune", "frozen"}), sorted({ratio / 3, ratio, min(1.0, 3 * ratio)}),
            sorted({0.0, rec.l2sp, rec.l2sp / 10, rec.l2sp * 10}), sorted({0, depth - rec.layers})):
        if mode != "finetune" and (l2sp or r != ratio):
            continue  # nothing to vary when the transferred blocks are fixed / read out
        reinit = min(reinit, depth - k) if mode != "head2toe" else 0
        candidate = Recommendation(k, mode, reinit, {**rec.lr_ratios, "transferred": r}, l2sp, rec.l2)
        if candidate.key() not in {c.key() for c in out}:
            out.append(candidate)
    return out


def halving_plan(budget: int) -> tuple[int, int]:
    """(candidates, rounds) of successive halving (Jamieson & Talwalkar 2016) within ``budget``
    epochs: round r trains n / 2^r candidates for 2^r epochs each (n epochs a round), so n
    candidates cost n x (log2 n + 1) epochs; n is the largest power of two that fits."""
    n = 1
    while 2 * n * (math.log2(2 * n) + 1) <= budget:
        n *= 2
    if n * (math.log2(n) + 1) > budget:
        raise ConfigError(f"--search budget {budget} is below one epoch; give at least 1")
    return n, int(math.log2(n)) + 1


def search(rec: Recommendation, net, train: ImageData, held: ImageData, base: TransferConfig, depth: int,
           budget: int, device: str = "auto", seed: int = 0) -> dict:
    """Successive halving over :func:`neighbours` of ``rec`` (``rec`` itself always among the
    candidates): each round trains every candidate from the start for twice the last round's epochs
    on ``train``, scores it on ``held`` (a split of the target's training set) and keeps the better
    half. Returns the rounds, the epochs spent and the winner."""
    n, rounds = halving_plan(budget)
    others = [c for c in neighbours(rec, depth) if c.key() != rec.key()]
    random.Random(seed).shuffle(others)
    alive = [rec, *others[: n - 1]]
    history, spent = [], 0
    for r in range(rounds):
        epochs = 2 ** r
        scored = []
        for candidate in alive:
            config = dataclasses.replace(base, **candidate.transfer_values(), epochs=epochs, seed=seed)
            result, _ = train_transfer(net, train, held, config, device)
            spent += epochs
            scored.append((result.test_acc, candidate))
        scored.sort(key=lambda s: -s[0])
        history.append({"epochs": epochs, "candidates": [{**c.transfer_values(), "held_out_acc": acc}
                                                         for acc, c in scored]})
        alive = [c for _, c in scored[: max(1, len(scored) // 2)]]
    best_acc, winner = scored[0]
    winner.reasons = {k: f"successive-halving winner ({100 * best_acc:.1f}% held-out after {epochs} epoch(s)); "
                      f"advice was: {rec.reasons.get(k, '')}" for k in ("layers", "mode", "reinit", "lr_ratios", "l2sp", "l2")}
    return {"budget": budget, "epochs_spent": spent, "candidates": n, "rounds": history,
            "winner": winner, "winner_held_out_acc": best_acc}


def write_advice(path: str | Path, payload: dict) -> Path:
    """Write the advice JSON (recommendation objects as their JSON form)."""
    def default(value):
        if isinstance(value, Recommendation):
            return value.to_json()
        if dataclasses.is_dataclass(value):
            return to_dict(value)
        raise TypeError(type(value))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=default))
    return path


def read_advice(path: str | Path) -> Recommendation:
    """The recommendation in an ``advise --out`` file."""
    try:
        payload = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"advice file {path} does not exist: run `contrastive-lw advise --out {path}` first") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"advice file {path} is not JSON: {err}") from None
    if not isinstance(payload, dict) or "recommendation" not in payload:
        raise ConfigError(f"advice file {path} holds no 'recommendation'")
    return Recommendation.from_json(payload["recommendation"])
