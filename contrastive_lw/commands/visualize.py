"""``contrastive-lw visualize``: redraw the figures of a saved study, or draw those of a pretraining run."""
from __future__ import annotations

import argparse

HELP = ("redraw figures from a saved study (filter grids, curves, chart), a pretraining run "
        "(filters, units of every block) or transfer runs (the ideal image of each class)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", nargs="+", help="a compare --out directory, a pretrain run directory, or "
                                                   "transfer run directories (one row of class images each)")
    parser.add_argument("--units", type=int, default=64,
                        help="for a pretrain run: units per block shown by activation maximisation "
                             "(units_layerK.png; 0: none)")
    parser.add_argument("--out", default=None,
                        help="for transfer runs: the class-image PNG (default RUN/class_images.png)")
    parser.add_argument("--steps", type=int, default=200, help="for transfer runs: gradient-ascent steps")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..checkpoint import layer_checkpoints, load_backbone
    from ..errors import UserError
    from ..study import Study, StudyConfig, write_report
    from ..visualize import maximize_activation, save_filter_grid

    if all((Path(d) / "state.pt").is_file() and (Path(d) / "config.yaml").is_file() for d in args.run_dir):
        print(_class_images(args))
        return 0
    if len(args.run_dir) > 1:
        raise UserError("several directories are drawn together only when all are transfer runs")
    run_dir = Path(args.run_dir[0])
    if (run_dir / "results.json").is_file():
        study = Study(StudyConfig(), run_dir)
        path = write_report(run_dir, study.load_records(), _saved_setup(run_dir))
        print(f"figures in {run_dir / 'figures'}, report {path}")
    elif layer_checkpoints(run_dir):
        net = load_backbone(run_dir)
        print(save_filter_grid(net.first_conv().weight, run_dir / "filters_layer1.png", "block-1 filters"))
        for k in range(1, net.num_blocks + 1) if args.units > 0 else ():
            patches, size = maximize_activation(net, k, args.units), net.receptive_field(k)
            print(save_filter_grid(patches, run_dir / f"units_layer{k}.png",
                                   f"block {k}: the {size}x{size} patch that excites each unit most"))
    else:
        raise UserError(f"{run_dir} holds neither results.json (a study), layerK.pt (a pretraining run) nor "
                        "config.yaml and state.pt (a transfer run)")
    return 0


def _saved_setup(run_dir) -> str:
    import json

    from ..config import from_dict
    from ..study import Study, StudyConfig

    saved = json.loads((run_dir / "results.json").read_text())
    study = Study(from_dict(StudyConfig, saved["config"], "results.json config"), run_dir)
    study.setup = saved["setup"]
    return study.setup_text()


def _class_images(args):
    """One row per transfer run: the ideal image of each class (visualize.class_images)."""
    from pathlib import Path

    from ..attack import load_transfer_model
    from ..config import load_yaml
    from ..visualize import save_class_image_grid

    models, test = {}, None
    for run_dir in map(Path, args.run_dir):
        model, test = load_transfer_model(run_dir)
        saved = load_yaml(run_dir / "config.yaml")
        models[f"{Path(saved['init']).name}, {saved['transfer']['mode']}\n{run_dir.name}"] = model
    out = args.out or Path(args.run_dir[0]) / "class_images.png"
    return save_class_image_grid(models, test.class_names, test.images.shape[1:], out, args.steps)
