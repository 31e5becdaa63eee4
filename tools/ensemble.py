"""Several trained models of the same classes as one: their predicted probabilities averaged (an output ensemble).

    python tools/ensemble.py MODEL MODEL [MODEL ...] --out FILE

Made for two runs from one pre-trained encoder: the encoder frozen throughout (train_cnn.py --init ENCODER
--freeze-epochs EPOCHS: features learned from every source, the best on another lab's microscope) and fine-tuned
(--freeze-epochs 5 --finetune-lr 2e-4: the best at home). Fine-tuning fits the labelled lab's images and forgets some
of what the encoder saw elsewhere; averaging the two models' outputs keeps most of both (Wortsman et al., CVPR 2022,
ensemble the zero-shot and the fine-tuned model; docs/microscopes.md has what it does on PBC and BCCD). Equal
weights: nothing is chosen on an evaluation. The members must agree on classes, input side and framing; each keeps
its own preprocessing (stain normalisation inside it). Writes a plain Keras .h5, the members nested in it, with the
metadata they share and, per member, its file, sha256 and what differs; inspect_model.py evaluate and predict take
it like any model.
"""
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))
import cli  # noqa: E402
from runfiles import UserError  # noqa: E402

# What the members must share: the same outputs, and images decoded the same way for every one of them.
MUST_AGREE = ("classes", "image_size", "framing")


def parse_args(argv=None):
    parser = cli.make_parser(__doc__.split("\n")[0], prog="tools/ensemble.py")
    parser.add_argument("models", type=Path, nargs="+", metavar="MODEL", help="two or more .h5 models")
    parser.add_argument("--out", type=Path, required=True, help="the ensemble's .h5")
    args = parser.parse_args(argv)
    if len(args.models) < 2:
        raise UserError(f"{args.models[0]}: one model (expected two or more to average)")
    if args.out.resolve() in {m.resolve() for m in args.models}:
        raise UserError(f"--out {args.out}: one of the members (expected a new file)")
    if not args.out.parent.is_dir():
        raise UserError(f"--out {args.out}: the folder {args.out.parent} does not exist")
    return args


def shared_metadata(paths: list[Path], metas: list[dict]) -> dict:
    """The metadata every member holds alike, and per member its file, sha256 and the fields that differ.
    Members that disagree on a MUST_AGREE field end in one line naming it."""
    import selfsup
    for key in MUST_AGREE:
        values = [meta.get(key) for meta in metas]
        first = next((i for i, v in enumerate(values) if v != values[0]), None)
        if first is not None:
            raise UserError(f"{paths[first]}: its {key} {values[first]} differs from {paths[0]}'s {values[0]} "
                            f"(expected members trained on the same classes, image size and framing)")
    keys = set().union(*metas)
    shared = {k: metas[0][k] for k in keys if all(k in m and m[k] == metas[0][k] for m in metas)}
    members = [{"path": str(path), "sha256": selfsup.file_sha256(path),
                **{k: meta[k] for k in sorted(keys - set(shared)) if k in meta}}
               for path, meta in zip(paths, metas)]
    return {**shared, "ensemble": {"rule": "mean of the members' probabilities", "members": members}}


def build_ensemble(members: list):
    """One Keras model: uint8 images in, the mean of the members' softmax outputs out."""
    import keras
    side = members[0].input_shape[1]
    inputs = keras.Input((side, side, 3), dtype="uint8", name="image")
    outputs = []
    for i, member in enumerate(members):
        member.name = f"member_{i}"  # the members' own names may be equal; the nested models' must not be
        outputs.append(member(inputs))
    mean = keras.layers.Average(dtype="float32", name="mean_probability")(outputs)
    return keras.Model(inputs, mean, name="ensemble")


def main(argv=None):
    args = parse_args(argv)
    from runfiles import load_core_model, read_h5_metadata, save_model_h5
    members = [load_core_model(path) for path in args.models]
    for path, member in zip(args.models, members):
        if member.input_shape != members[0].input_shape or member.output_shape != members[0].output_shape:
            raise UserError(f"{path}: input {member.input_shape} and output {member.output_shape} (expected those of "
                            f"{args.models[0]}: {members[0].input_shape}, {members[0].output_shape})")
    meta = shared_metadata(args.models, [read_h5_metadata(path) for path in args.models])
    save_model_h5(build_ensemble(members), args.out, meta)
    print(f"wrote {args.out}: the mean of {len(members)} models' probabilities")


if __name__ == "__main__":
    cli.run_main(main)
