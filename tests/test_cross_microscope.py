"""tools/cross_microscope.py without training anything: its refusals, the train_cnn.py and tools/ensemble.py
command lines of the encoder levers (subprocess.run recorded, the files the next step reads made by hand), the
ensemble's rebuild rule, and summary.md's statistics."""
import json
import os

import h5py
import pytest

from conftest import exit_status, load_tool

xm = load_tool("cross_microscope")


def _argv(tmp_path, *extra):
    (tmp_path / "bccd").mkdir(exist_ok=True)
    argv = ["--data", tmp_path / "pbc", "--bccd", tmp_path / "bccd", "--out", tmp_path / "out", *extra]
    return [str(a) for a in argv]


def _value(cmd, flag):
    """The value after `flag` in a command line (None when the flag is absent)."""
    return cmd[cmd.index(flag) + 1] if flag in cmd else None


@pytest.fixture
def recorded(monkeypatch):
    """subprocess.run replaced: each command recorded, and what it would write made by hand (train_cnn.py: the run
    folder's model.h5 and a metrics.json with train_seconds 100 + seed; tools/ensemble.py: its --out)."""
    commands = []

    def run(cmd, check, cwd):
        commands.append([str(c) for c in cmd])
        out = _value(commands[-1], "--out")
        if cmd[1].endswith("train_cnn.py"):
            os.makedirs(out, exist_ok=True)
            open(os.path.join(out, "model.h5"), "wb").close()
            with open(os.path.join(out, "metrics.json"), "w") as f:
                json.dump({"train_seconds": 100.0 + int(_value(commands[-1], "--seed"))}, f)
        else:
            open(out, "wb").close()

    monkeypatch.setattr(xm.subprocess, "run", run)
    return commands


@pytest.mark.parametrize("extra, says", [
    (["--levers", "plain", "ssl_frozen+lpft"], "--levers ssl_frozen+lpft: these start from a self-supervised encoder"),
    (["--levers", "ssl_lpft", "--encoder", "ENC", "--epochs", "5"], "--epochs 5: LP-FT trains 5 head-only epochs"),
    (["--levers", "plain", "--holdout", "1"], "--holdout 1.0: expected a fraction"),
])
def test_refusals_before_training(tmp_path, capsys, recorded, extra, says):
    (tmp_path / "ENC").touch()
    argv = [str(tmp_path / "ENC") if a == "ENC" else a for a in _argv(tmp_path, *extra)]
    assert exit_status(xm.main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err, err
    assert recorded == [] and not (tmp_path / "out").exists()


def test_missing_encoder_of_one_seed_named(tmp_path, capsys, recorded):
    # seed 0's encoder exists, seed 1's does not: the line names seed 1's file, and nothing is trained for seed 0
    template = str(tmp_path / "ssl_pretrain_seed{seed}" / "encoder.h5")
    (tmp_path / "ssl_pretrain_seed0").mkdir()
    (tmp_path / "ssl_pretrain_seed0" / "encoder.h5").touch()
    argv = _argv(tmp_path, "--seeds", "0", "1", "--encoder", template)
    assert exit_status(xm.main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"{tmp_path / 'ssl_pretrain_seed1' / 'encoder.h5'}: no such encoder file for seed 1" in err
    assert "pretrain_ssl.py encoder.h5" in err
    assert recorded == [] and not (tmp_path / "out").exists()


def test_default_levers(tmp_path):
    assert xm.parse_args(_argv(tmp_path)).levers == list(xm.LEVERS)
    with_encoder = xm.parse_args(_argv(tmp_path, "--encoder", "e.h5")).levers
    assert with_encoder == [*xm.LEVERS, "ssl_frozen", "ssl_lpft", "ssl_frozen_blocks", "ssl_lpft_frozen_bn",
                            "ssl_frozen_color", "ssl_frozen+lpft", "ssl_frozen_blocks+lpft",
                            "ssl_frozen+lpft_frozen_bn", "ssl_frozen_color+lpft", "ssl_noisy_student"]


def test_frozen_blocks_lever_reads_every_block_and_its_ensemble_shares_the_lpft_run(tmp_path):
    args = xm.parse_args(_argv(tmp_path, "--epochs", "20", "--encoder", "e{seed}.h5"))
    frozen_blocks = xm.train_command(args, "WBC_100", "ssl_frozen_blocks", 0)
    assert _value(frozen_blocks, "--pooling") == "blocks" and _value(frozen_blocks, "--freeze-epochs") == "20"
    assert "--pooling" not in xm.train_command(args, "WBC_100", "ssl_frozen", 0)
    assert xm.ENSEMBLES["ssl_frozen_blocks+lpft"] == ("ssl_frozen_blocks", "ssl_lpft")
    # only LP-FT needs more epochs than its head-only phase: a frozen lever trains at any --epochs
    (tmp_path / "e0.h5").touch()
    short = xm.parse_args(_argv(tmp_path, "--epochs", "3", "--encoder", str(tmp_path / "e{seed}.h5"),
                                "--levers", "ssl_frozen", "ssl_frozen_blocks"))
    xm.check_args(short)
    short.levers = ["ssl_frozen_blocks+lpft"]
    with pytest.raises(xm.cli.UserError, match="--epochs 3: LP-FT"):
        xm.check_args(short)
    short.levers = ["ssl_frozen+lpft_frozen_bn"]
    with pytest.raises(xm.cli.UserError, match="--epochs 3: LP-FT.*ssl_lpft_frozen_bn"):
        xm.check_args(short)
    frozen_bn = xm.train_command(args, "WBC_100", "ssl_lpft_frozen_bn", 0)
    assert "--frozen-bn" in frozen_bn and _value(frozen_bn, "--freeze-epochs") == "5"
    assert "--frozen-bn" not in xm.train_command(args, "WBC_100", "ssl_lpft", 0)
    # the colour-jittered frozen lever: frozen for every epoch, its head trained on jittered images; no other lever
    # jitters colour, and its ensemble shares the seed's LP-FT run
    frozen_color = xm.train_command(args, "WBC_100", "ssl_frozen_color", 0)
    assert _value(frozen_color, "--color-jitter") == "0.5" and _value(frozen_color, "--freeze-epochs") == "20"
    assert all("--color-jitter" not in xm.train_command(args, "WBC_100", lever, 0)
               for lever in ["ssl_frozen", "ssl_lpft", "ssl_frozen_blocks", "ssl_lpft_frozen_bn"])
    assert xm.ENSEMBLES["ssl_frozen_color+lpft"] == ("ssl_frozen_color", "ssl_lpft")


def test_encoder_levers_commands(tmp_path, recorded):
    encoder = tmp_path / "ssl_pretrain_seed1" / "encoder.h5"
    args = xm.parse_args(_argv(tmp_path, "--epochs", "20", "--image-size", "96", "--holdout", "0", "--seeds", "1",
                               "--encoder", str(tmp_path / "ssl_pretrain_seed{seed}" / "encoder.h5")))
    run = xm.train(args, "WBC_100", "ssl_frozen+lpft", 1)

    # the two members trained first, in their own levers' folders, on the default recipe (no PLAIN options)
    assert len(recorded) == 3, recorded
    frozen, lpft, ensemble = recorded
    runs = tmp_path / "out" / "runs"
    for cmd, lever in ((frozen, "ssl_frozen"), (lpft, "ssl_lpft")):
        assert cmd[1].endswith("train_cnn.py")
        assert _value(cmd, "--out") == str(runs / f"WBC_100_{lever}_seed1")
        assert _value(cmd, "--init") == str(encoder)
        assert (_value(cmd, "--seed"), _value(cmd, "--epochs"), _value(cmd, "--image-size")) == ("1", "20", "96")
        assert _value(cmd, "--holdout") == "0.0"
        assert not {"--frame-cell", "--stain-norm", "--stain-jitter", "--resume"} & set(cmd), cmd
    assert _value(frozen, "--freeze-epochs") == "20" and "--finetune-lr" not in frozen  # frozen: all --epochs
    assert _value(lpft, "--freeze-epochs") == "5" and _value(lpft, "--finetune-lr") == "2e-4"
    # then the two averaged into the ensemble's own folder, with a metrics.json that says it trained nothing
    assert ensemble[1].endswith("ensemble.py")
    assert ensemble[2:] == [str(runs / "WBC_100_ssl_frozen_seed1" / "model.h5"),
                            str(runs / "WBC_100_ssl_lpft_seed1" / "model.h5"),
                            "--out", str(runs / "WBC_100_ssl_frozen+lpft_seed1" / "model.h5")]
    assert run == runs / "WBC_100_ssl_frozen+lpft_seed1"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train_seconds"] == 202.0 and "sum of its members" in metrics["train_seconds_is"]

    # finished: nothing is run again; a member retrained (its model.h5 newer): only the ensemble is rebuilt
    xm.train(args, "WBC_100", "ssl_frozen+lpft", 1)
    assert len(recorded) == 3
    member = runs / "WBC_100_ssl_lpft_seed1" / "model.h5"
    stat = member.stat()
    os.utime(member, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    xm.train(args, "WBC_100", "ssl_frozen+lpft", 1)
    assert len(recorded) == 4 and recorded[3][1].endswith("ensemble.py")


def test_plain_lever_command_without_holdout(tmp_path, recorded):
    # the levers of before: PLAIN options, no encoder, and train_cnn.py's own --holdout when none is given
    args = xm.parse_args(_argv(tmp_path, "--levers", "plain"))
    cmd = xm.train_command(args, "WBC_10", "plain", 2)
    assert "--init" not in cmd and "--holdout" not in cmd and "--resume" not in cmd
    assert cmd[-len(xm.PLAIN):] == xm.PLAIN


def test_every_lever_is_options_train_cnn_accepts():
    import train_cnn
    for lever, options in xm.LEVERS.items():
        args = train_cnn.parse_args(options)  # an unknown or misspelt option would exit here
        assert args.recipe == ("report" if lever == "report" else "default")
    assert train_cnn.parse_args(xm.LEVERS["framing+stain+style_noise"]).style_noise == 0.5


def _row(lever, seed, bal, collapsed=False):
    return {"split": "WBC_100", "lever": lever, "seed": seed, "target": "bccd", "mode": "plain",
            "accuracy": bal + 0.1, "balanced_accuracy": bal, "macro_f1": bal - 0.1, "collapsed": collapsed}


def test_summarise_mean_and_std_over_seeds():
    rows = [_row("ssl_frozen+lpft", 0, 0.5), _row("ssl_frozen+lpft", 1, 0.6, collapsed=True),
            _row("ssl_frozen+lpft", 2, 0.7), _row("plain", 0, 0.4)]
    header, rule, plain, ensemble = xm.summarise(rows)
    assert "balanced acc." in header and rule.startswith("| ---")
    assert plain == "| WBC_100 | plain | bccd | plain | 1 | 0.500 | 0.400 | 0.300 | 0 |"  # one seed: no ±
    # the sample standard deviation (ddof 1): 0.5, 0.6, 0.7 -> 0.100 (ddof 0 would give 0.082)
    assert ensemble == "| WBC_100 | ssl_frozen+lpft | bccd | plain | 3 | 0.700 ± 0.100 | 0.600 ± 0.100 | " \
                       "0.500 ± 0.100 | 1 |"


def test_noisy_student_is_taught_by_the_seeds_ensemble_trained_first_on_the_pbc_pool(tmp_path, recorded):
    pool = [tmp_path / "pbc" / "WBC_unlabeled", tmp_path / "pbc" / "WBC_100" / "train" / "data"]
    for folder in pool:
        folder.mkdir(parents=True)
    args = xm.parse_args(_argv(tmp_path, "--epochs", "20", "--seeds", "0", "--levers", "ssl_noisy_student",
                               "--encoder", str(tmp_path / "enc{seed}.h5")))
    run = xm.train(args, "WBC_10", "ssl_noisy_student", 0)
    assert [os.path.basename(c[1]) for c in recorded] == ["train_cnn.py", "train_cnn.py", "ensemble.py",
                                                          "train_cnn.py"]
    student = recorded[-1]
    runs = tmp_path / "out" / "runs"
    assert _value(student, "--out") == str(runs / "WBC_10_ssl_noisy_student_seed0") == str(run)
    assert _value(student, "--teacher") == str(runs / "WBC_10_ssl_frozen+lpft_seed0" / "model.h5")
    assert student[student.index("--unlabeled") + 1:student.index("--unlabeled") + 3] == [str(p) for p in pool]
    assert _value(student, "--init") == str(tmp_path / "enc0.h5") and _value(student, "--finetune-lr") == "2e-4"
    assert _value(student, "--color-jitter") == "0.5" and _value(student, "--unlabeled-ratio") == "1"
    import train_cnn
    h5py.File(tmp_path / "enc0.h5", "w").close()  # parsing opens the --init file and reads its metadata
    options = student[student.index("--quiet") + 1:]  # what the lever adds: options train_cnn.py accepts
    parsed = train_cnn.parse_args(options)
    assert parsed.teacher is not None and parsed.color_jitter == 0.5
