"""Pre-train ResNet50 on CAM16 (tumor vs normal), fine-tune it on a WBC split, and compare with training from scratch.

    python pretrain_resnet.py                                    # synthetic demo data, both stages + comparison
    python pretrain_resnet.py --data ROOT --split WBC_10 --image-size 96
    python pretrain_resnet.py --data ROOT --init imagenet        # ImageNet -> CAM16 -> WBC (downloads when online)
    python pretrain_resnet.py --data ROOT --init resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5
    python pretrain_resnet.py --data ROOT --skip-pretrain --init imagenet   # fine-tune from --init directly
    python pretrain_resnet.py --data ROOT --skip-pretrain --init runs/ssl_resnet50_WBC_100_seed0/encoder.h5

Stage 1 trains on CAM16 train/, selects the epoch on CAM16 val/ and reports CAM16 test/ (accuracy, ROC AUC).
Stage 2 puts a new 5-class head on the selected backbone and fine-tunes on --split: --head-epochs with the backbone
frozen (batch-norm in inference mode), then --epochs with everything trainable at the lower --lr. The baselines
(--compare, on by default) get the same stage-2 budget: from scratch, whole network, --head-epochs + --epochs.

Under --out: pretrain/, finetune_frozen/, finetune/ (standard run folders; finetune/model.h5 is the final
model), baseline_<arm>/..., comparison.csv and comparison.md (WBC validation metrics of every arm).
"""
import json
from pathlib import Path

import cli
from runfiles import UserError
import recipes
import runfiles

# Stage-2 learning rates with the backbone frozen and for the from-scratch baseline (--lr, the fine-tuning
# rate of an unfrozen pre-trained backbone, comes from --recipe).
HEAD_LR, SCRATCH_LR = 1e-3, 1e-3


def parse_args(argv=None):
    parser = cli.make_parser(__doc__.split("\n")[0], prog="pretrain_resnet.py")
    cli.add_data_args(parser)
    g = parser.add_argument_group("ResNet50 and pre-training")
    g.add_argument("--recipe", choices=sorted(recipes.RESNET_RECIPES), default="default",
                   help=f"fills every option left unset: default is the project's CNN recipe's loss, "
                        "class weights, schedule, rotation and shear at the fine-tuning rate --lr "
                        f"{recipes.RESNET_RECIPES['default']['lr']:g}")
    g.add_argument("--init", default="scratch",
                   help="scratch (random), imagenet (Keras' download; needs the internet once), the PATH of a "
                        "local Keras ResNet50 weights file without top, e.g. "
                        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5, or the encoder.h5 of "
                        "pretrain_ssl.py --model resnet50")
    g.add_argument("--skip-pretrain", action="store_true", help="no CAM16 stage: fine-tune from --init directly")
    g.add_argument("--pretrained", type=Path, default=None,
                   help="a stage-1 run folder (or its model.h5) to fine-tune instead of pre-training again, "
                        "e.g. OUT/pretrain of an earlier run on another split (default: none, pre-train here)")
    g.add_argument("--pretrain-epochs", type=int, default=None, help="CAM16 epochs (default 4 on demo data, 10)")
    g.add_argument("--pretrain-lr", type=float, default=None,
                   help="CAM16 learning rate (default 1e-3 from scratch, 1e-4 from pre-trained weights)")
    g.add_argument("--head-epochs", type=int, default=2, help="WBC epochs with the backbone frozen (new head only)")
    g.add_argument("--head-lr", type=float, default=HEAD_LR, help="learning rate while the backbone is frozen")
    g.add_argument("--scratch-lr", type=float, default=SCRATCH_LR,
                   help="learning rate of the from-scratch WBC baseline")
    g.add_argument("--bn-momentum", type=float, default=None,
                   help="batch-norm momentum of the backbone (default 0.9; Keras' ResNet50 uses 0.99, whose "
                        "moving statistics lag behind on small datasets: validation stuck at chance)")
    g.add_argument("--compare", action="store_true", default=True,
                   help="also train the baselines (WBC from scratch; CAM16 from scratch when --init is weights) "
                        "and print one comparison table (default: on)")
    g.add_argument("--no-compare", dest="compare", action="store_false", help="train only the --init path")
    cli.add_training_args(parser, epochs="3 on the demo data, 10 otherwise", batch_size=32)
    cli.add_augmentation_args(parser)
    cli.add_output_args(parser)
    cli.describe_defaults(parser, {key: f"default {'on' if v is True else v}"
                                  for key, v in recipes.RESNET_RECIPES["default"].items()})
    args = cli.parse_run_args(parser, argv)
    recipes.apply_recipe(args, table=recipes.RESNET_RECIPES)
    cli.resolve_data(args, generate=False)
    if args.epochs is None:
        args.epochs = 3 if args.demo else 10
    if args.pretrain_epochs is None:
        args.pretrain_epochs = 4 if args.demo else 10
    if args.init not in ("scratch", "imagenet") and not Path(args.init).is_file():
        raise UserError(f"--init {args.init}: no such weights file (expected scratch, imagenet or the path of a "
                        f"Keras ResNet50 weights file without top, or a pretrain_ssl.py --model resnet50 encoder.h5)")
    if args.pretrain_lr is None:
        args.pretrain_lr = 1e-3 if args.init == "scratch" else 1e-4
    if args.image_size < 32:
        raise UserError(f"--image-size {args.image_size}: ResNet50 needs at least 32 pixels")
    cli.check_positive(args, "epochs", "pretrain_epochs", "batch_size", "lr", "pretrain_lr", "head_lr",
                       "scratch_lr")
    cli.check_non_negative(args, "class_weight_power", "bn_recalibrate", "patience")
    cli.check_augmentation_args(args)
    if args.bn_momentum is not None and not 0 < args.bn_momentum < 1:
        raise UserError(f"--bn-momentum {args.bn_momentum}: expected a number between 0 and 1")
    if args.head_epochs < 0:
        raise UserError(f"--head-epochs {args.head_epochs}: expected 0 or more")
    return args


def config_for(args, epochs: int, lr: float, **changes):
    import training
    config = training.TrainConfig.from_args(args)
    config.epochs, config.lr, config.verbose = epochs, lr, 0 if args.quiet else 1
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def pretrain_cam16(args, run_dir: Path, weights, init_name: str) -> dict:
    """Stage 1: CAM16 train -> epoch selected on CAM16 val -> CAM16 test accuracy and ROC AUC."""
    import data
    import models
    import training
    files = data.find_cam16(args.data)
    kw = dict(size=args.image_size, cache_dir=args.cache_dir, use_cache=not args.no_cache, verbose=not args.quiet,
              max_pixels=args.max_pixels)
    train = data.load_images(files["train"], name="CAM16 train", **kw)
    if "val" not in files:
        raise UserError(f"--data {args.data}: no CAM16 validation set (expected CAM16_100cls_10mask/val/data/"
                        f"normal|tumor/) to select the pre-training epoch on")
    val = data.load_images(files["val"], name="CAM16 val", **kw)
    test = data.load_images(files["test"], name="CAM16 test", **kw) if "test" in files else None
    if not args.quiet:
        print(f"CAM16 train {train.counts()}  val {val.counts()}  test {test.counts() if test else 'absent'}")
    # No label smoothing or class weights on the balanced two-class task; tissue has no orientation.
    config = config_for(args, args.pretrain_epochs, args.pretrain_lr, label_smoothing=0.0, class_weight=False)
    result = training.train(run_dir, lambda: models.build_from_init(weights, 2, args.image_size, args.bn_momentum),
                            train, val, config, args=cli.args_dict(args), resume=args.resume,
                            hooks=training.Hooks(selection_set=val),
                            extra_metadata={"model": "resnet50", "stage": "pretrain_cam16", "init": init_name,
                                            "demo_data": args.demo,
                                            "selection": "CAM16 val (hold-out and validation are both CAM16 val)"})
    result["cam16_test"] = evaluate_cam16(run_dir, test) if test is not None else None
    return result


def evaluate_cam16(run_dir: Path, test) -> dict:
    """The selected model, once, on CAM16 test: accuracy and ROC AUC of the tumor probability."""
    import metrics
    import feeding
    from sklearn.metrics import roc_auc_score
    core = runfiles.load_core_model(run_dir / "model.h5")
    probs = feeding.predict(core, test.x)
    m = metrics.classification_metrics(test.y, probs, test.classes)
    tumor = list(test.classes).index("tumor")
    auc = float(roc_auc_score(test.y == tumor, probs[:, tumor])) if len(set(test.y)) == 2 else float("nan")
    out = {"accuracy": m["accuracy"], "roc_auc": auc, "balanced_accuracy": m["balanced_accuracy"],
           "confusion_matrix": m["confusion_matrix"], "images": len(test), "counts": test.counts()}
    import devices
    if devices.is_chief():  # several processes: process 0 writes
        runfiles.write_json(run_dir / "cam16_test.json", out)
    return out


def finetune(args, out: Path, start, train_set, val_set, arm: str) -> dict:
    """Stage 2 from `start` (a CAM16 model.h5, or init weights): new head with the backbone frozen, then all."""
    import models
    import training
    meta = {"model": "resnet50", "arm": arm, "split": args.split, "demo_data": args.demo}
    n = len(train_set.classes)

    def new_head():
        if isinstance(start, Path):
            return models.replace_head(runfiles.load_core_model(start), n, name="resnet50_wbc")
        return models.build_from_init(start, n, args.image_size, args.bn_momentum)

    build = new_head
    if args.head_epochs:
        frozen = out / "finetune_frozen"
        training.train(frozen, new_head, train_set, val_set,
                       config_for(args, args.head_epochs, args.head_lr, lr_schedule="constant"),
                       args=cli.args_dict(args), resume=args.resume,
                       hooks=training.Hooks(before_fit=lambda core: models.set_backbone_trainable(core, False)),
                       extra_metadata={**meta, "stage": "finetune_frozen"})

        def build():  # noqa: F811 - continue from the selected frozen-phase model
            return runfiles.load_core_model(frozen / "model.h5")
    return training.train(out / "finetune", build, train_set, val_set, config_for(args, args.epochs, args.lr),
                          args=cli.args_dict(args), resume=args.resume, test_set=args._test_set,
                          hooks=training.Hooks(before_fit=lambda core: models.set_backbone_trainable(core, True)),
                          extra_metadata={**meta, "stage": "finetune"})


def scratch_baseline(args, out: Path, train_set, val_set) -> dict:
    """WBC only, random init, whole network trained for the same stage-2 budget (--head-epochs + --epochs)."""
    import models
    import training

    def build():
        return models.build_from_init(None, len(train_set.classes), args.image_size, args.bn_momentum)
    return training.train(out / "finetune", build, train_set, val_set, config_for(args, args.head_epochs + args.epochs, args.scratch_lr),
                          args=cli.args_dict(args), resume=args.resume, test_set=args._test_set,
                          extra_metadata={"model": "resnet50", "arm": "scratch", "stage": "finetune",
                                          "split": args.split, "demo_data": args.demo})


def arm_path(args, weights, out: Path, train_set, val_set, init_name: str, skip: bool) -> dict:
    """One arm of the comparison: [CAM16 pre-training from `weights`] -> WBC fine-tuning."""
    if weights is None and skip:
        result = scratch_baseline(args, out, train_set, val_set)
        return {"arm": "scratch", "wbc": result, "cam16_test": None, "run": out / "finetune"}
    if skip:
        result = finetune(args, out, weights, train_set, val_set, init_name)
        return {"arm": init_name, "wbc": result, "cam16_test": None, "run": out / "finetune"}
    arm = "scratch -> CAM16" if weights is None else f"{init_name} -> CAM16"
    if args.pretrained is not None and out == args.out_root:
        return reuse_pretrained(args, out, train_set, val_set)
    pre = pretrain_cam16(args, out / "pretrain", weights, init_name)
    test = pre["cam16_test"]
    if test and not args.quiet:
        print(f"CAM16 test ({out / 'pretrain'}): accuracy {test['accuracy']:.4f}  ROC AUC {test['roc_auc']:.4f}")
    result = finetune(args, out, out / "pretrain" / "model.h5", train_set, val_set, arm)
    return {"arm": arm, "wbc": result, "cam16_test": test, "cam16_val": pre["val_accuracy_selected"],
            "run": out / "finetune"}


def reuse_pretrained(args, out: Path, train_set, val_set) -> dict:
    """The main arm from an earlier stage-1 model (--pretrained), with that run's CAM16 figures."""
    model = args.pretrained / "model.h5" if args.pretrained.is_dir() else args.pretrained
    run = model.parent
    runfiles.load_core_model(model)  # one clear line when it is not a model
    meta = runfiles.read_h5_metadata(model)
    test = run / "cam16_test.json"
    test = json.loads(test.read_text()) if test.exists() else None
    val = run / "metrics.json"
    val = json.loads(val.read_text()).get("val_accuracy_selected") if val.exists() else None
    arm = f"{meta.get('init', 'scratch')} -> CAM16"
    result = finetune(args, out, model, train_set, val_set, arm)
    return {"arm": arm, "wbc": result, "cam16_test": test, "cam16_val": val, "run": out / "finetune"}


def comparison_rows(arms: list[dict]) -> list[dict]:
    rows = []
    for a in arms:
        w, t = a["wbc"], a.get("cam16_test") or {}
        rows.append({"arm": a["arm"], "wbc_val_accuracy": w["val_accuracy_selected"],
                     "wbc_balanced_accuracy": w["balanced_accuracy"], "wbc_macro_f1": w["macro_f1"],
                     "majority_baseline": w["majority_baseline"], "collapsed": w["collapsed_to_majority"],
                     "cam16_test_accuracy": t.get("accuracy", ""), "cam16_test_roc_auc": t.get("roc_auc", ""),
                     "run": str(a["run"])})
    return rows


def write_comparison(out: Path, rows: list[dict], split: str) -> str:
    import csv
    import io

    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else ("-" if v == "" else str(v))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    cols = ["arm", "wbc_val_accuracy", "wbc_balanced_accuracy", "wbc_macro_f1", "majority_baseline",
            "collapsed", "cam16_test_accuracy", "cam16_test_roc_auc"]
    lines = [f"WBC {split} validation (epoch selected on the training hold-out)", "",
             "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    import devices
    if devices.is_chief():  # several processes: process 0 writes
        runfiles.atomic_write_text(out / "comparison.csv", buf.getvalue())
        runfiles.atomic_write_text(out / "comparison.md", text)
    return text


def main(argv=None):
    args = parse_args(argv)
    out = cli.resolve_run_dir(args, f"resnet_{args.split}_seed{args.seed}")
    if args.resume:
        cli.check_resume(args, out)
    cli.import_keras_quietly(args)  # applies --devices: its mistakes answer before the demo data is made
    cli.ensure_data(args)
    args.out_root = out
    import models
    init_name = (args.init if args.init in ("scratch", "imagenet")
                 else "ssl-encoder" if models.is_saved_model(args.init) else "file")
    weights = models.resolve_init(args.init)
    train_set, val_set = cli.load_wbc_split(args, verbose=not args.quiet)
    args._test_set = cli.load_test_set(args, train_set.classes)  # every arm's final WBC model meets it once

    arms = [arm_path(args, weights, out, train_set, val_set, init_name, args.skip_pretrain)]
    if args.compare:
        if arms[0]["arm"] != "scratch":
            arms.append(arm_path(args, None, out / "baseline_scratch", train_set, val_set, "scratch", skip=True))
        if weights is not None and not args.skip_pretrain:
            arms.append(arm_path(args, None, out / "baseline_cam16", train_set, val_set, "scratch", skip=False))
    print()
    print(write_comparison(out, comparison_rows(arms), args.split))
    print(f"run folder: {out}  (final model: {out / 'finetune' / 'model.h5'})"
          + ("  [synthetic demo data: says the code works, nothing about real cells]" if args.demo else ""))


if __name__ == "__main__":
    cli.run_main(main)
