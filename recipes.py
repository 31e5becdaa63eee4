"""Named training recipes: a recipe fills in every option the user did not set on the command line.

RECIPES (train_cnn.py, train_masked.py, bench.py): 'report' reproduces the original course report (its dropout CNN
with a flatten head, its augmentation, no class weights); 'default' is the project's recipe, chosen by measurement
(docs/results.md). RESNET_RECIPES: pretrain_resnet.py's."""
from __future__ import annotations

RECIPES = {
    "report": dict(width=32, depth=4, dropout=0.1, dropout_step=0.1, dense=128, pooling="flatten",
                   batchnorm=False, class_weight=False, class_weight_power=1.0, rotation=20.0, shear=10.0,
                   label_smoothing=0.0, lr=1e-3, lr_schedule="constant", zoom=0.0, shift=0.0, min_steps=0,
                   stem_stride=1, bn_recalibrate=0, frame_cell=0.0, stain_norm="none", stain_jitter=0.0),
    # stem_stride 'auto': a stride-2 first convolution from 160 px up (models.build_cnn): at 224 px it kept the
    # accuracy of the plain CNN on PBC at a quarter of the operations.
    # bn_recalibrate: batch-norm statistics recomputed from plain training images before each evaluation (the
    # moving averages describe the heavily augmented images; feeding.recalibrate_batchnorm).
    # Square-root class weights: full inverse frequency (basophil ~30x neutrophil on course proportions) made
    # the PBC models call neutrophils basophils; the root kept balanced accuracy and raised macro-F1 (docs/results.md).
    # frame_cell, stain_norm, stain_jitter: each image framed on its white cell (the nucleus spanning half the
    # side), colours matched to the training set's inside the model, stain amounts jittered in training. On PBC
    # they raised balanced accuracy most where labels are fewest and ended the collapse on another lab's
    # microscope (docs/microscopes.md, docs/results.md).
    "default": dict(width=32, depth=4, dropout=0.05, dropout_step=0.05, dense=128, pooling="avg",
                    batchnorm=True, class_weight=True, class_weight_power=0.5, rotation=180.0, shear=10.0,
                    label_smoothing=0.1, lr=2e-3, lr_schedule="cosine", zoom=0.1, shift=0.05, min_steps=20,
                    stem_stride="auto", bn_recalibrate=512, frame_cell=0.5, stain_norm="reinhard",
                    stain_jitter=0.2),
}
# pretrain_resnet.py's recipes: the default recipe's loss, class weights, schedule and rotation/shear; --lr is the
# fine-tuning rate of an unfrozen pre-trained backbone, so lower. The CNN's small-split levers (zoom, shift,
# min_steps, BN recalibration) are off: they were chosen on the CNN, not measured on ResNet50.
RESNET_RECIPES = {
    "default": {**{k: RECIPES["default"][k] for k in ("lr_schedule", "label_smoothing", "class_weight",
                                                      "class_weight_power", "rotation", "shear")},
                "lr": 1e-4, "zoom": 0.0, "shift": 0.0, "min_steps": 0, "bn_recalibrate": 0},
}
MODEL_KEYS = ("width", "depth", "dropout", "dropout_step", "dense", "pooling", "batchnorm", "stem_stride")


def apply_recipe(args, name: str | None = None, table: dict = RECIPES):
    """Set each option still None on `args` from the recipe `name` (default: args.recipe) of `table`."""
    recipe = table[name or args.recipe]
    for key, value in recipe.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def default_texts() -> dict[str, str]:
    """Each recipe-filled option's default in words for --help, e.g. lr: 'default recipe 0.002, report
    recipe 0.001' (cli.describe_defaults)."""
    def show(value):
        if isinstance(value, bool):
            return "on" if value else "off"
        return f"{value:g}" if isinstance(value, float) else str(value)

    texts = {}
    for key in RECIPES["default"]:
        values = {name: show(recipe[key]) for name, recipe in sorted(RECIPES.items())}
        if len(set(values.values())) == 1:
            texts[key] = f"default {next(iter(values.values()))} in every recipe"
        else:
            texts[key] = ", ".join(f"{name} recipe {value}" for name, value in values.items())
    return texts


def model_kwargs(args) -> dict:
    return {k: getattr(args, k) for k in MODEL_KEYS}


def recipe_model_kwargs(name: str) -> dict:
    """The CNN shape of recipe `name` as models.build_cnn keywords (the recipe's own values, no options applied)."""
    return {k: v for k, v in RECIPES[name].items() if k in MODEL_KEYS}


def add_cnn_args(parser):
    """The CNN's shape; each default comes from --recipe."""
    g = parser.add_argument_group("model (defaults from --recipe, shown for each)")
    g.add_argument("--recipe", choices=sorted(RECIPES), default="default",
                   help="report: the course report's CNN and training; default: the project's measured recipe")
    g.add_argument("--width", type=int, default=None, help="filters in the first conv block (doubling per block)")
    g.add_argument("--depth", type=int, default=None, help="conv + max-pool blocks")
    g.add_argument("--dropout", type=float, default=None, help="dropout after the first block")
    g.add_argument("--dropout-step", type=float, default=None, help="dropout added per deeper block")
    g.add_argument("--dense", type=int, default=None, help="units of the dense layer before the softmax (0: none)")
    g.add_argument("--pooling", choices=("flatten", "avg", "blocks"), default=None,
                   help="flatten (the report's), global average pooling, or blocks: every block's average pooled "
                        "output side by side (for a head on a frozen pre-trained encoder)")
    g.add_argument("--batchnorm", action="store_const", const=True, default=None,
                   help="batch normalisation after each conv")
    g.add_argument("--no-batchnorm", dest="batchnorm", action="store_const", const=False,
                   help="no batch normalisation")
    g.add_argument("--stem-stride", choices=("auto", "1", "2"), default=None,
                   help="stride of the first convolution: 2 runs the later blocks on a quarter of the pixels; "
                        "auto: 2 from 160 px up, else 1")
    return g
