"""``contrastive-lw visualize``: redraw the figures of a saved study, or draw those of a pretraining run."""
from __future__ import annotations

import argparse

HELP = ("redraw figures from a saved study (filter grids, curves, chart) or a pretraining run "
        "(filters, units of every block)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a compare --out directory, or a pretrain run directory")
    parser.add_argument("--units", type=int, default=64,
                        help="for a pretrain run: units per block shown by activation maximisation "
                             "(units_layerK.png; 0: none)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..checkpoint import layer_checkpoints, load_backbone
    from ..errors import UserError
    from ..study import Study, StudyConfig, write_report
    from ..visualize import maximize_activation, save_filter_grid

    run_dir = Path(args.run_dir)
    if (run_dir / "results.json").is_file():
        study = Study(StudyConfig(), run_dir)
        path = write_report(run_dir, study.load_records(), _saved_setup(run_dir))
        print(f"figures in {run_dir / 'figures'}, report {path}")
    elif layer_checkpoints(run_dir):
        net = load_backbone(run_dir)
        print(save_filter_grid(net.blocks[0].conv.weight, run_dir / "filters_layer1.png", "block-1 filters"))
        for k in range(1, net.num_blocks + 1) if args.units > 0 else ():
            patches, size = maximize_activation(net, k, args.units), net.receptive_field(k)
            print(save_filter_grid(patches, run_dir / f"units_layer{k}.png",
                                   f"block {k}: the {size}x{size} patch that excites each unit most"))
    else:
        raise UserError(f"{run_dir} holds neither results.json (a study) nor layerK.pt (a pretraining run)")
    return 0


def _saved_setup(run_dir) -> str:
    import json

    from ..config import from_dict
    from ..study import Study, StudyConfig

    saved = json.loads((run_dir / "results.json").read_text())
    study = Study(from_dict(StudyConfig, saved["config"], "results.json config"), run_dir)
    study.setup = saved["setup"]
    return study.setup_text()
