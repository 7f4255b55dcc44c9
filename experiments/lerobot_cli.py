"""`foresight-lerobot`: move episodes between our HDF5 datasets and LeRobot v3.0.

    foresight-lerobot export data/tabletop.h5 exports/tabletop_lerobot
    foresight-lerobot import ~/lerobot/so101_pick data/so101.h5 --image-size 64

Import appends to the HDF5 file (creating it), so the episodes feed offline scoring and
world-model training like any collected dataset.
"""

from __future__ import annotations

import argparse

from experiments.common import clean_errors


@clean_errors
def main(argv=None) -> None:
    from envs.lerobot import export_lerobot, import_lerobot

    parser = argparse.ArgumentParser(prog="foresight-lerobot", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="write a dataset as LeRobot v3.0")
    exp.add_argument("dataset", help="our HDF5 dataset")
    exp.add_argument("out_dir", help="a new (or empty) directory")
    imp = sub.add_parser("import", help="append a LeRobot v3.0 dataset to an HDF5 dataset")
    imp.add_argument("in_dir", help="the LeRobot dataset's root (holding meta/, data/, videos/)")
    imp.add_argument("dataset", help="our HDF5 dataset (created if missing)")
    imp.add_argument("--image-size", type=int, default=None, help="resize frames to N x N (e.g. 64)")
    args = parser.parse_args(argv)
    if args.command == "export":
        print(f"wrote {export_lerobot(args.dataset, args.out_dir)}")
    else:
        n = import_lerobot(args.in_dir, args.dataset, image_size=args.image_size)
        print(f"appended {n} episodes to {args.dataset}")


if __name__ == "__main__":
    main()
