"""Train the dropout CNN on one WBC split and write a run folder.

    python train_cnn.py                                  # synthetic demo data, a few minutes on a CPU
    python train_cnn.py --data ROOT --split WBC_10       # your data in the course layout
    python train_cnn.py --data ROOT --recipe report      # the original report's recipe
    python train_cnn.py --out runs/x --resume            # continue an interrupted run
    python train_cnn.py --init runs/ssl/encoder.h5 --freeze-epochs 2   # from a pretrain_ssl.py encoder
    python train_cnn.py --data ROOT --split WBC_1 --unlabeled ROOT/WBC_100/train   # semi-supervised

Run folder: args.json, history.csv, metrics.json, model.h5, val_predictions.csv, curves.png, confusion.png.
"""
import cli


def parse_args(argv=None):
    parser = cli.make_parser(__doc__.split("\n")[0], prog="train_cnn.py")
    cli.add_data_args(parser)
    cli.add_cnn_training_args(parser)
    cli.add_domain_args(parser)
    cli.add_semisup_args(parser)
    return cli.resolve_semisup_args(cli.resolve_domain_args(cli.resolve_cnn_args(cli.parse_run_args(parser, argv))))


def main(argv=None):
    args = parse_args(argv)
    run_dir = cli.resolve_run_dir(args, f"cnn_{args.split}_seed{args.seed}")
    if args.resume:
        cli.check_resume(args, run_dir)
    cli.import_keras_quietly(args)  # applies --devices: its mistakes answer before the demo data is made
    cli.ensure_data(args)
    import devices
    import domain
    import selfsup
    import training

    train_set, val_set = cli.load_wbc_split(args, verbose=not args.quiet)
    test_set = cli.load_test_set(args, train_set.classes)
    config = training.TrainConfig.from_args(args)
    config.verbose = 0 if args.quiet else 1

    domain_meta = domain.metadata(args, train_set.x)

    build = domain.cnn_builder(args, len(train_set.classes), domain_meta)

    hooks = training.Hooks(build_train_model=domain.training_wrapper(args))
    semi_meta = {}
    if args.unlabeled:
        import semisup
        hooks, semi_meta = semisup.from_args(args, hooks, train_set, val_set, config)
    result = selfsup.train_from_init(run_dir, build, train_set, val_set, config, cli.args_dict(args), args.resume,
                                     {"model": "dropout_cnn", "recipe": args.recipe, "split": args.split,
                                      "demo_data": args.demo, **domain_meta, **semi_meta},
                                     selfsup.FineTune.from_args(args), hooks=hooks, test_set=test_set)
    training.print_summary(run_dir, result)
    if args.unlabeled and devices.is_chief():  # process 0 wrote history.csv
        warning = semisup.pool_mix_warning(run_dir, train_set.y, train_set.classes)
        if warning:
            print(warning)


if __name__ == "__main__":
    cli.run_main(main)
