"""Validation metrics of a saved model as saved, and with its batch-norm statistics recomputed from plain or augmented
training images (feeding.recalibrate_batchnorm): does a recipe's validation swing live in the BN statistics?

    python tools/bn_recalibration_check.py RUN_DIR --data OUT --split WBC_100

RUN_DIR is a run folder of train_cnn.py (its model.h5 and args.json: image size, seed, augmentation). Prints one
line per variant: accuracy, balanced accuracy and macro-F1 on the split's validation set. Nothing is written.
"""
import json
import sys
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))
import cli  # noqa: E402
from runfiles import UserError  # noqa: E402
import augment
import runfiles


def parse_args(argv=None):
    parser = cli.make_parser(__doc__.split("\n")[0], prog="tools/bn_recalibration_check.py")
    parser.add_argument("run_dir", type=Path, help="a train_cnn.py run folder (model.h5, args.json)")
    parser.add_argument("--data", type=Path, required=True, help="the course-layout root the run trained on")
    parser.add_argument("--split", default="WBC_100", help="the split whose train/ recalibrates and val/ scores")
    parser.add_argument("--images", type=int, default=512, help="training images that recompute the statistics")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cli.import_keras_quietly()
    args_file = args.run_dir / "args.json"
    if not args_file.is_file():
        raise UserError(f"{args.run_dir}: no args.json (expected a run folder of train_cnn.py)")
    run_args = json.loads(args_file.read_text())
    cli.import_keras_quietly()
    import data
    import feeding
    import metrics
    core = runfiles.load_core_model(args.run_dir / "model.h5")
    saved = [[w.numpy().copy() for w in layer.weights] for layer in core.layers]
    size = core.input_shape[1]
    files = data.find_split(args.data, args.split)
    share = run_args.get("frame_cell") or 0.0  # decoded as the run decoded them
    train = data.load_images(files.train, size, verbose=False, frame_share=share)
    val = data.load_images(files.val, size, verbose=False, frame_share=share)
    config = run_args["resolved_config"]
    layer = augment.make_augmentation(**config["augment"], seed=config["seed"])
    augmented = np.concatenate([np.asarray(layer(train.x[start:start + 64], training=True))
                                for start in range(0, len(train), 64)])  # the same rows, warped as in training

    def score(label):
        m = metrics.classification_metrics(val.y, feeding.predict(core, val.x), val.classes)
        print(f"{label:46s} accuracy {m['accuracy']:.3f}  balanced {m['balanced_accuracy']:.3f}  "
              f"macro-F1 {m['macro_f1']:.3f}", flush=True)

    score("as saved")
    for label, images in (("BN statistics from plain training images", train.x),
                          ("BN statistics from augmented training images", augmented)):
        for layer, weights in zip(core.layers, saved):
            layer.set_weights(weights)
        feeding.recalibrate_batchnorm(core, images, args.images, config["batch_size"], config["seed"])
        score(label)
    return 0


if __name__ == "__main__":
    cli.run_main(lambda: main())
