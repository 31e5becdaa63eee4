"""gradcam.py: the feature map it explains, heatmaps that point at the evidence (also inside a nested backbone),
and the labelled PNGs and gradcam.csv that `inspect_model.py gradcam` writes."""
import csv
import json

import numpy as np
import pytest
from PIL import Image

import keras
from keras import layers

import gradcam
import inspect_model
import models
import runfiles
from conftest import exit_status


def call(argv):
    return exit_status(inspect_model.main, argv)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def nested_toy(image_size=16):
    """A ResNet50-shaped core model in miniature: fixed preprocessing, a nested backbone (conv, residual add,
    pooling inside), an Identity 'features' layer and a softmax head, as models.build_resnet50 builds it.
    The backbone's first conv reads red into channel 0 and blue into channel 1, and the head maps channel 0 to
    class 0: so class 0 means 'red', and Grad-CAM for it must light up where the red is."""
    inner_in = keras.Input((image_size, image_size, 3))
    a = layers.Conv2D(2, 1, name="stem_conv")(inner_in)
    b = layers.Conv2D(2, 1, name="block_conv")(a)
    y = layers.Activation("relu", name="block_out")(layers.Add(name="block_add")([a, b]))
    backbone = keras.Model(inner_in, layers.GlobalAveragePooling2D(name="avg_pool")(y), name="resnet50_backbone")
    inputs = models.image_input(image_size)
    x = layers.Rescaling(1.0 / 255.0, name="scale_0_1")(inputs)
    x = layers.Identity(name="features")(backbone(x))
    model = keras.Model(inputs, models.classifier_head(x, 2, dense=0), name="toy_resnet")
    stem = np.zeros((1, 1, 3, 2), np.float32)
    stem[0, 0, 0, 0] = stem[0, 0, 2, 1] = 1.0
    model.get_layer("resnet50_backbone").get_layer("stem_conv").set_weights([stem, np.zeros(2, np.float32)])
    block = np.zeros((1, 1, 2, 2), np.float32)
    model.get_layer("resnet50_backbone").get_layer("block_conv").set_weights([block, np.zeros(2, np.float32)])
    model.get_layer("predictions").set_weights([np.array([[8.0, -8.0], [-8.0, 8.0]], np.float32),
                                                np.zeros(2, np.float32)])
    return model


def red_square_image():
    image = np.zeros((16, 16, 3), np.uint8)
    image[..., 2] = 20  # faintly blue everywhere ...
    image[2:8, 9:15] = (255, 0, 0)  # ... but a red square near the top right, which outweighs the blue
    return image


def test_heatmaps_of_a_trained_cnn_have_the_feature_maps_size_and_range(cnn_run, demo_root):
    run_dir, _ = cnn_run
    images = sorted((demo_root / "WBC_100" / "val" / "data" / "Lymphocyte").iterdir())[:3]
    core = runfiles.load_core_model(run_dir / "model.h5")
    cam = gradcam.GradCam(core)
    # the last conv, followed through its batch norm and activation, inside the stain normalisation's wrapper
    assert cam.layer_name == "dropout_cnn/block2_relu"
    x = np.stack([np.asarray(Image.open(p).convert("RGB").resize((32, 32))) for p in images])
    heat, probs, ids = cam(x)
    assert heat.shape == (3, 16, 16) and heat.dtype == np.float32
    assert heat.min() >= 0.0 and heat.max() <= 1.0
    assert np.allclose(probs.sum(1), 1.0, atol=1e-3) and list(ids) == list(probs.argmax(1))
    _, _, ids_other = cam(x, [0, 0, 0])
    assert list(ids_other) == [0, 0, 0]


def test_a_model_without_convolutions_has_no_feature_map():
    dense = keras.Sequential([keras.Input((8, 8, 3)), layers.Flatten(), layers.Dense(2, activation="softmax")],
                             name="flat")
    with pytest.raises(runfiles.UserError, match="no convolutional layer"):
        gradcam.GradCam(dense)


def test_inside_a_nested_backbone_the_heatmap_points_at_the_evidence():
    keras.mixed_precision.set_global_policy("float32")
    cam = gradcam.GradCam(nested_toy())
    assert cam.layer_name == "resnet50_backbone/block_out"
    heat, probs, ids = cam(red_square_image()[None])
    assert ids[0] == 0 and probs[0, 0] > 0.5  # predicted 'red'
    # red pushes class 0 up and blue pushes it down: the heatmap is 1 on the red square and 0 elsewhere
    assert heat[0][2:8, 9:15].min() == pytest.approx(1.0) and heat[0].sum() == pytest.approx(36.0)
    # Explaining 'blue' instead: the faint blue everywhere, not the red square.
    heat_blue, _, ids_blue = cam(red_square_image()[None], [1])
    assert ids_blue[0] == 1 and heat_blue[0][2:8, 9:15].max() == 0.0 and heat_blue[0][12:, :8].min() > 0.99


def test_caption_names_true_predicted_and_explained_class():
    classes = ["basophil", "lymphocyte"]
    probs = np.array([0.25, 0.75])
    assert gradcam.caption(classes, probs, 1, "lymphocyte") == "true: lymphocyte   predicted: lymphocyte (p=0.750)"
    assert gradcam.caption(classes, probs, 1) == "predicted: lymphocyte (p=0.750)"
    assert gradcam.caption(classes, probs, 0, "basophil") == \
        "true: basophil   predicted: lymphocyte (p=0.750)   explained: basophil (p=0.250)"


def test_labelled_png_holds_the_overlay_at_its_size_with_room_for_caption_and_colour_bar(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    cam = np.zeros((8, 8), np.float32)
    cam[2:5, 3:6] = 1.0
    path = tmp_path / "x.png"
    x0, y0 = gradcam.save_labelled(image, cam, 64, "true: a   predicted: b (p=0.900)", path)
    with Image.open(path) as im:
        png = np.asarray(im.convert("RGB"))
    assert png.shape[0] > 64 + y0 - 1 and png.shape[1] > 64 + 40  # caption above, colour bar beside
    picture = png[y0:y0 + 64, x0:x0 + 64].astype(int)
    expected = gradcam.overlay(image, cam, 64).astype(int)
    assert np.abs(picture - expected).mean() < 2.0  # the overlay itself, pixel for pixel (PNG rounding aside)
    # The colour bar beside it runs through the colour map: red at its top, blue at its bottom.
    bar = png[y0 + 2:y0 + 62, 64 + 10:64 + 16].astype(int)
    assert bar[0, :, 0].mean() > 100 and bar[0, :, 2].mean() < 60
    assert bar[-1, :, 2].mean() > 100 and bar[-1, :, 0].mean() < 60


def test_gradcam_command_writes_labelled_pngs_and_a_csv(cnn_run, demo_root, tmp_path, capsys):
    run_dir, _ = cnn_run
    images = sorted((demo_root / "WBC_100" / "val" / "data" / "Lymphocyte").iterdir())[:3]
    out = tmp_path / "cam"
    assert call([run_dir / "model.h5", "gradcam", *images, "--out", out, "--display-size", 40]) == 0
    captured = capsys.readouterr()
    assert "block2_relu" in captured.err and "wrote 3 heatmaps (40x40" in captured.out
    pngs = sorted(out.glob("*.png"))
    rows = read_csv(out / "gradcam.csv")
    assert len(pngs) == 3 and len(rows) == 3
    for png in pngs:
        with Image.open(png) as im:
            assert im.size[0] > 40 and im.size[1] > 40
    # The true class comes from the folder name (Lymphocyte), the probabilities from the model.
    assert {r["true"] for r in rows} == {"lymphocyte"}
    for r in rows:
        assert 0.0 <= float(r["probability"]) <= float(r["predicted_probability"]) <= 1.0
    # One image: "1 heatmap".
    assert call([run_dir / "model.h5", "gradcam", images[0], "--out", tmp_path / "one"]) == 0
    assert "wrote 1 heatmap (" in capsys.readouterr().out


def test_the_command_line_on_a_saved_nested_model(tmp_path, capsys):
    keras.mixed_precision.set_global_policy("float32")
    model = nested_toy()
    path = tmp_path / "toy.h5"
    runfiles.save_model_h5(model, path, {"classes": ["red", "blue"], "image_size": 16, "model": "toy_resnet"})
    Image.fromarray(red_square_image()).save(tmp_path / "red.png")
    assert call([path, "summary", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["gradcam_feature_map"] == {"layer": "resnet50_backbone/block_out", "shape": [16, 16, 2]}
    assert info["classes"] == ["red", "blue"]
    assert call([path, "predict", tmp_path / "red.png", "--out", tmp_path / "p.csv"]) == 0
    assert read_csv(tmp_path / "p.csv")[0]["predicted"] == "red"
    assert call([path, "gradcam", tmp_path / "red.png", "--out", tmp_path / "cam", "--class", "blue"]) == 0
    assert [p.name for p in (tmp_path / "cam").glob("*.png")] == ["red_gradcam_blue.png"]
    row = read_csv(tmp_path / "cam" / "gradcam.csv")[0]
    assert (row["true"], row["explained_class"], row["predicted"]) == ("", "blue", "red")
    # A Keras 3 .keras file of the same model loads too; it simply has no training metadata.
    model.save(tmp_path / "toy.keras")
    assert call([tmp_path / "toy.keras"]) == 0
    assert "training metadata: none stored" in capsys.readouterr().out
