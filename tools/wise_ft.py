"""Between a fine-tuned model and the frozen-encoder model it started from: their weights interpolated (WiSE-FT).

    python tools/wise_ft.py RUN [--alpha 0.5] [--out FILE]

RUN is a run folder of train_cnn.py (or train_masked.py) with --init ENCODER --freeze-epochs N, N below --epochs:
RUN/head_frozen/model.h5 is the pre-trained encoder with a head trained on the labels (linear probing), RUN/model.h5
the whole network fine-tuned from it. Fine-tuning fits the labelled lab's images and forgets some of what the
pre-trained encoder saw elsewhere; the weights half-way between keep much of both (Wortsman et al., CVPR 2022,
"Robust fine-tuning of zero-shot models"; 0.5 is their default, chosen without looking at any evaluation). The
batch-norm statistics of the mixed model are recomputed from up to 512 plain training images of the run's split, as
the default recipe does before each evaluation. Writes RUN/model_wise<alpha>.h5 (or --out): a plain Keras model
with the run's metadata (framing included) and what was mixed; evaluate it with inspect_model.py.
"""
import json
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))
import cli  # noqa: E402
from runfiles import UserError  # noqa: E402

RECALIBRATION_IMAGES = 512


def parse_args(argv=None):
    parser = cli.make_parser(__doc__.split("\n")[0], prog="tools/wise_ft.py")
    parser.add_argument("run", type=Path, help="a run folder trained with --init and --freeze-epochs")
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="share of the fine-tuned weights: 0 = the frozen-encoder model, 1 = the fine-tuned one")
    parser.add_argument("--out", type=Path, default=None, help="output .h5 (default RUN/model_wise<alpha>.h5)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.alpha <= 1.0:
        raise UserError(f"--alpha {args.alpha}: expected a share between 0 and 1")
    for name in ("model.h5", "head_frozen/model.h5", "args.json"):
        if not (args.run / name).is_file():
            raise UserError(f"{args.run}: no {name} (expected a run of train_cnn.py --init ENCODER --freeze-epochs N "
                            f"with N below --epochs)")
    if args.out is None:
        args.out = args.run / f"model_wise{args.alpha:g}.h5"
    if not args.out.parent.is_dir():
        raise UserError(f"--out {args.out}: the folder {args.out.parent} does not exist")
    return args


def training_images(run_args: dict, size: int, frame_share: float, run: Path):
    """The run's training split, decoded as the model's inputs are (labels unused)."""
    import adapt
    folder = Path(run_args["data"]) / run_args["split"] / "train" / "data"
    if not folder.is_dir():
        raise UserError(f"{run}: its training images {folder} are not there (expected the run's --data folder)")
    return adapt.unlabeled_images(folder, size, frame_share, option=f"{run}: training images")


def main(argv=None):
    args = parse_args(argv)
    import adapt
    import feeding
    import framing
    from runfiles import load_core_model, read_h5_metadata, save_model_h5
    run_args = json.loads((args.run / "args.json").read_text())
    meta = read_h5_metadata(args.run / "model.h5")
    start = load_core_model(args.run / "head_frozen" / "model.h5")
    mixed = adapt.interpolate_weights(start, load_core_model(args.run / "model.h5"), args.alpha)
    images = training_images(run_args, int(meta["image_size"]), framing.frame_share(meta), args.run)
    used = feeding.recalibrate_batchnorm(mixed, images, RECALIBRATION_IMAGES, int(run_args.get("batch_size", 32)),
                                         int(run_args.get("seed", 0)))
    save_model_h5(mixed, args.out, {**meta, "wise_ft": {"alpha": args.alpha, "start": "head_frozen/model.h5",
                                                        "end": "model.h5", "batchnorm_images": int(used)}})
    print(f"wrote {args.out}: {args.alpha:g} x the fine-tuned weights + {1 - args.alpha:g} x the frozen-encoder "
          f"model's; batch-norm statistics from {used} training images")


if __name__ == "__main__":
    cli.run_main(main)
