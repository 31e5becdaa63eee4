"""Self-supervised pre-training of the CNN's (or ResNet50's) encoder on unlabeled images; writes a run folder.

    python pretrain_ssl.py                                   # synthetic demo data, a few minutes on a CPU
    python pretrain_ssl.py --data ROOT --split WBC_100 --unlabeled ROOT/WBC_unlabeled --image-size 64
    python train_cnn.py --data ROOT --split WBC_1 --init runs/ssl_cnn_WBC_100_seed0/encoder.h5

The pool: every image under the --unlabeled folders (recursively; folder names ignored, so pRCC_nolabel/ or
CAM16_100cls_10mask/ work as they are) plus the --split's training images with their labels ignored. A folder
holding a validation image is refused. Two augmented views of each image (random resized crop, rotation and
flips, colour jitter, greyscale, blur) train the encoder with SimCLR (--method simclr, docs/ssl.md says why) or
VICReg. Every --probe-every epochs a probe (logistic regression on the frozen features of the split's labelled
training images) is scored on the validation set: reporting only, unless --select-on probe.

Run folder: args.json, history.csv (loss, probe scores), curves.png, encoder.h5 (plain Keras: uint8 images in,
pooled features out; the layer names of train_cnn.py's model), metrics.json.
"""
from pathlib import Path

import cli
import recipes


def parse_args(argv=None):
    parser = cli.make_parser(__doc__.split("\n")[0], prog="pretrain_ssl.py")
    g = cli.add_data_args(parser)
    g.add_argument("--unlabeled", type=Path, nargs="+", default=[], metavar="DIR",
                   help="folders of unlabeled images, searched recursively (default: none; the split's training "
                        "images are always in the pool)")
    m = parser.add_argument_group("model and method")
    m.add_argument("--model", choices=("cnn", "resnet50"), default="cnn",
                   help="cnn: the dropout CNN of --recipe's shape (what train_cnn.py --init takes); resnet50")
    m.add_argument("--recipe", choices=sorted(recipes.RECIPES), default="default", help="the CNN's shape")
    m.add_argument("--frame-cell", type=float, default=None, metavar="SHARE",
                   help="decode each image framed on its white cell, the nucleus spanning SHARE of the side (0: off; "
                        "default: --recipe's, so that train_cnn.py --init fine-tunes on what the encoder saw: "
                        f"{recipes.default_texts()['frame_cell']})")
    m.add_argument("--method", choices=("simclr", "vicreg"), default="simclr", help="the joint-embedding loss")
    m.add_argument("--temperature", type=float, default=0.2, help="SimCLR's softmax temperature")
    m.add_argument("--proj-dim", type=int, default=128, help="output size of the projection head")
    t = parser.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=None, help="passes over the pool (default 30; 8 on the demo data)")
    t.add_argument("--batch-size", type=int, default=None,
                   help="images per step, two views each (default 128; 64 on the demo data)")
    t.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate, cosine decay over the run")
    t.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW's decoupled weight decay")
    t.add_argument("--max-minutes", type=float, default=None,
                   help="stop after the epoch that passes this much training time (default: no limit)")
    t.add_argument("--seed", type=int, default=0, help="seed for initialisation, shuffling and the views")
    t.add_argument("--precision", choices=("auto", "float32", "mixed_bfloat16", "mixed_float16"), default="auto",
                   help="auto: mixed_bfloat16 on GPUs and bf16-capable CPUs, else float32")
    v = parser.add_argument_group("the two views (applied on the device)")
    v.add_argument("--crop-scale", type=float, default=0.2, help="random resized crops of MIN to 1 of the area")
    v.add_argument("--color-jitter", type=float, default=0.5, help="colour-jitter strength (train_cnn.py's meaning)")
    v.add_argument("--hue-jitter", type=float, default=None, metavar="H",
                   help="the jitter's hue strength alone (default: --color-jitter's; 0: views keep the stain's hue)")
    v.add_argument("--grayscale", type=float, default=0.2, help="share of views made grey")
    v.add_argument("--blur", type=float, default=0.5, help="share of views blurred")
    v.add_argument("--rotation", type=float, default=180.0, help="random rotation range, degrees (+/-)")
    p = parser.add_argument_group("probe (reporting only)")
    p.add_argument("--probe", choices=("logreg", "knn", "none"), default="logreg",
                   help="classifier on frozen features of the split's labelled training images, scored on val")
    p.add_argument("--probe-every", type=int, default=2, help="probe every N epochs (and after the last)")
    p.add_argument("--select-on", choices=("last", "probe"), default="last",
                   help="which epoch's encoder.h5 is kept: last; probe = best probe balanced accuracy (this "
                        "looks at the validation set, so its later validation scores are optimistic)")
    cli.add_output_args(parser, supervised=False)
    args = parser.parse_args(argv)
    cli.check_unlabeled_folders(args.unlabeled)
    cli.resolve_data(args, generate=False)
    if args.epochs is None:
        args.epochs = 8 if args.demo else 30
    if args.frame_cell is None:
        args.frame_cell = recipes.RECIPES[args.recipe]["frame_cell"]
    cli.check_frame_cell(args.frame_cell)
    if args.batch_size is None:
        args.batch_size = 64 if args.demo else 128
    cli.check_positive(args, "epochs", "batch_size", "lr", "temperature", "proj_dim", "probe_every", "max_minutes")
    cli.check_augmentation_args(args)
    if args.select_on == "probe" and args.probe == "none":
        raise cli.UserError("--select-on probe needs a probe (--probe logreg or knn)")
    return args


def main(argv=None):
    args = parse_args(argv)
    cli.import_keras_quietly()
    cli.ensure_data(args)
    import data
    import selfsup

    run_dir = cli.resolve_run_dir(args, f"ssl_{args.model}_{args.split}_seed{args.seed}")
    files = data.find_split(args.data, args.split)
    pool_files, pool_info = selfsup.gather_pool(args.unlabeled, list(files.train.paths), list(files.val.paths),
                                                args.data)
    pool = data.load_images(pool_files, name="pool", verbose=not args.quiet, **cli.decode_options(args))
    labelled, val = cli.load_wbc_split(args, verbose=not args.quiet)
    if not args.quiet:
        print(f"pool: {len(pool)} images from {pool_info['sources']}")
    result = selfsup.pretrain(run_dir, args, pool.x, labelled, val, pool_info)
    print(f"\nrun folder: {run_dir}\n  encoder.h5: epoch {result['kept_epoch']} ({result['selection']}); "
          f"final loss {result['final_loss']:.4f}; probe balanced acc {result['probe_balanced_accuracy']:.3f}, "
          f"macro-F1 {result['probe_macro_f1']:.3f} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    cli.run_main(main)
