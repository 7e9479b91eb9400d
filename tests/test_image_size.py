"""The image size a run chooses, said at the start with its reason, and how images reach it: the shorter side
resized with the run's interpolation, then the centre square (never squashed)."""

import json

import numpy as np
import pytest
from conftest import run_train
from PIL import Image

from fixmatch_accel.config import TrainConfig, resolve
from fixmatch_accel.data import to_rgb
from fixmatch_accel.data.loaders import ImageDataset

TINY = ["--model", "small_cnn", "--per_device_train_batch_size", "3", "--mu", "1", "--max_train_steps", "1",
        "--logging_steps", "1", "--checkpointing_steps", "0", "--num_labeled", "6", "--dataloader_num_workers", "0",
        "--no-plots", "--max_eval_samples", "6"]


def banded(width: int, height: int) -> Image.Image:
    """Red outer quarters, green middle half (along the longer side)."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[..., 1] = 200
    if width >= height:
        pixels[:, : width // 4] = pixels[:, -(width // 4):] = (200, 0, 0)
    else:
        pixels[: height // 4] = pixels[-(height // 4):] = (200, 0, 0)
    return Image.fromarray(pixels)


def write_photos(root, sizes, per_class=4):
    for c, name in enumerate(("ant", "cow", "yak")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            w, h = sizes[i % len(sizes)]
            Image.fromarray(np.full((h, w, 3), 40 + 80 * c, np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("width, height", [(64, 32), (32, 64)])
def test_the_shorter_side_is_resized_and_the_centre_square_kept(width, height):
    out = np.asarray(to_rgb(banded(width, height), 16))
    # squashed, a quarter of each side would be red (200); cropped, only the filter's edge blends a little in
    assert out.shape == (16, 16, 3) and out[..., 0].max() < 60 and np.median(out[..., 1]) > 190
    # timm / torchvision's eval transform for config.json's crop_mode 'center' gives the same pixels
    from torchvision import transforms as T

    theirs = T.Compose([T.Resize(16, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(16)])(
        banded(width, height))
    assert np.array_equal(np.asarray(to_rgb(banded(width, height), 16, "bicubic")), np.asarray(theirs))


def test_the_loaders_resize_with_the_runs_interpolation():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    rows = [dict(image=image, label=0)]
    bicubic, = ImageDataset(rows, [0], "image", "label", 16, interpolation="bicubic")[0][:1]
    assert np.array_equal(bicubic.permute(1, 2, 0).numpy(), np.asarray(image.resize((16, 16), Image.BICUBIC)))
    bilinear, = ImageDataset(rows, [0], "image", "label", 16)[0][:1]
    assert not np.array_equal(bicubic.numpy(), bilinear.numpy())
    # fixmatch-predict prepares images as the run did (config.json's resolved.interpolation)
    from fixmatch_accel.predict import _Images

    assert np.array_equal(_Images([image], 16, "bicubic")[0][0].numpy(), bicubic.numpy())


def test_the_size_follows_the_model_when_the_images_are_larger():
    def size(native, model_size, **kw):
        r = resolve(TrainConfig(dataset_name="x", **kw), device_type="cpu", dataset_image_size=lambda: native,
                    num_train=10, streaming=False, model_size=model_size)
        return r.image_size, r.size_reason

    assert size(32, 32) == (32, "the dataset's size")
    assert size(12, 32) == (12, "the dataset's size")
    assert size(640, 32, model="wrn28_2") == (32, "wrn28_2's input size; the dataset's images are larger (640 px)")
    assert size(None, 224, model="resnet50") == (224, "resnet50's input size; the dataset's images are of several "
                                                       "sizes")
    assert size(None, None, model="x") == (32, "the dataset's images are of several sizes and --model x names no "
                                                "input size")
    assert size(640, 32, image_size=64) == (64, "--image_size")


def test_large_photos_train_at_the_models_size_and_the_run_says_why(tmp_path):
    train = write_photos(tmp_path / "train", [(80, 60)])
    out = tmp_path / "run"
    result = run_train(["--train_dir", train, "--validation_dir", train, "--output_dir", out] + TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "images: 32 px (small_cnn's input size; the dataset's images are larger (80 px))" in result.stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["resolved"]["image_size"] == 32 and cfg["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert cfg["resolved"]["image_size_reason"] == "small_cnn's input size; the dataset's images are larger (80 px)"
    assert (cfg["pretrained_cfg"]["crop_mode"], cfg["pretrained_cfg"]["crop_pct"]) == ("center", 1.0)
    assert cfg["pretrained_weights"] is None and cfg["settings"]["pretrained"] is False
