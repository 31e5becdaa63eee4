"""Train the dropout CNN on one WBC split with its segmentation masks and write a run folder.

    python train_masked.py                                     # synthetic demo data, --masks replace
    python train_masked.py --data ROOT --split WBC_10 --masks only        # the masked subset alone
    python train_masked.py --data ROOT --masks add --mask-fill blur       # masked copies beside the raw images
    python train_masked.py --data ROOT --consistency 1.0                  # raw images + mask-consistency penalty

--masks none: raw images only; only: the images that have a mask, masked; replace: every image, masked where it
has a mask (the report's "merged"); add: every raw image plus a masked copy of each image with a mask.
--consistency W trains on the raw images (as --masks none) while also feeding each image's masked copy through the
same model under the same random augmentation, adding W x the symmetric KL divergence between the two predictions
(zero for images without a mask). The validation set is always the raw validation images; model.h5 is the plain
core model. The per-class image counts of the chosen mode are printed and stored in metrics.json (mask_counts).
"""
import sys

import augment
import cli


def parse_args(argv=None):
    parser = cli.make_parser(__doc__.split("\n")[0], prog="train_masked.py")
    g = cli.add_data_args(parser, masks=True)
    g.add_argument("--consistency", type=float, default=0.0, metavar="WEIGHT",
                   help="> 0: train on raw images and penalise WEIGHT x the symmetric KL divergence between the "
                        "predictions for each image and its masked copy (--masks is then not used)")
    cli.add_cnn_training_args(parser)
    cli.add_domain_args(parser)
    args = cli.parse_run_args(parser, argv)
    if args.consistency and args.stain_jitter is None:
        args.stain_jitter = 0.0  # the consistency wrapper has its own augmentation: the recipe's jitter is off
    args = cli.resolve_domain_args(cli.resolve_cnn_args(args))
    if args.consistency < 0:
        raise cli.UserError(f"--consistency {args.consistency}: expected a weight >= 0")
    if args.consistency > 0 and augment.photometric_on(args):
        raise cli.UserError("--consistency warps each image and its masked copy as one 6-channel image: it takes "
                            f"no {cli.photometric_option_names('or')}")
    for name in ("stain_jitter", "style_noise"):
        if args.consistency and getattr(args, name):
            raise cli.UserError(f"--{name.replace('_', '-')} with --consistency: not supported together (the "
                                "consistency wrapper has its own augmentation); use one of them")
    args.mask_mode = "consistency" if args.consistency > 0 else args.masks
    return args


def mask_counts(images, paired=None) -> dict:
    """Per class: images the model trains on in this mode, how many of them are masked, how many raw."""
    masked = images.masked if paired is None else paired.masked
    out = {}
    for i, cls in enumerate(images.classes):
        of_class = images.y == i
        n_masked = int((masked & of_class).sum())
        out[cls] = {"images": int(of_class.sum()), "masked": n_masked, "raw": int(of_class.sum()) - n_masked}
    return out


def print_counts(mode: str, counts: dict):
    total = sum(c["images"] for c in counts.values())
    what = "raw images, masked copies for the penalty" if mode == "consistency" else "images, of which masked"
    print(f"--masks {mode}: {total} training images; per class ({what}): "
          + "  ".join(f"{cls} {c['images']} ({c['masked']})" for cls, c in counts.items()))
    empty = [cls for cls, c in counts.items() if c["images"] == 0]
    if empty:
        print(f"warning: no training images in this mode for {', '.join(empty)}: the model cannot learn "
              f"{'it' if len(empty) == 1 else 'them'}", file=sys.stderr)


def load_data(args):
    """(training set, paired masked copies or None, validation set) for the chosen mode."""
    verbose = not args.quiet
    if args.mask_mode != "consistency":
        train, val = cli.load_wbc_split(args, args.masks, args.mask_fill, verbose=verbose)
        return train, None, val
    train, val = cli.load_wbc_split(args, "none", verbose=verbose)
    # 'replace' gives the same files in the same order, masked where a mask exists: the pair of each raw image.
    paired, _ = cli.load_wbc_split(args, "replace", args.mask_fill, verbose=False)
    if list(paired.paths) != list(train.paths):
        raise cli.UserError(f"--data {args.data}: the raw and masked decodes of {args.split} differ "
                            "(files changed while loading?); run again")
    return train, paired, val


def main(argv=None):
    args = parse_args(argv)
    run_dir = cli.resolve_run_dir(args, f"masked_{args.mask_mode}_{args.split}_seed{args.seed}")
    if args.resume:
        cli.check_resume(args, run_dir)
    cli.import_keras_quietly(args)  # applies --devices: its mistakes answer before the demo data is made
    cli.ensure_data(args)
    import consistency
    import domain
    import selfsup
    import training

    train_set, paired, val_set = load_data(args)
    test_set = cli.load_test_set(args, train_set.classes)
    counts = mask_counts(train_set, paired)
    print_counts(args.mask_mode, counts)
    config = training.TrainConfig.from_args(args)
    config.verbose = 0 if args.quiet else 1

    domain_meta = domain.metadata(args, train_set.x)

    build = domain.cnn_builder(args, len(train_set.classes), domain_meta)

    hooks = training.Hooks(build_train_model=domain.training_wrapper(args))
    if paired is not None:
        hooks = training.Hooks(paired_x=paired.x, build_train_model=lambda core, cfg, steps: consistency.consistency_model(
            core, cfg.augment, args.consistency, cfg.seed))
    meta = {"model": "dropout_cnn", "recipe": args.recipe, "split": args.split, "demo_data": args.demo,
            "mask_mode": args.mask_mode, "mask_fill": args.mask_fill, "consistency_weight": args.consistency,
            "mask_counts": counts, **domain_meta}
    result = selfsup.train_from_init(run_dir, build, train_set, val_set, config, cli.args_dict(args), args.resume,
                                     meta, selfsup.FineTune.from_args(args), hooks=hooks, test_set=test_set)
    training.print_summary(run_dir, result)


if __name__ == "__main__":
    cli.run_main(main)
