"""Data loading, column detection and the labeled split."""

import json
from collections import Counter

import numpy as np
import pytest
from conftest import write_image_folder

from fixmatch_accel.config import TrainConfig
from fixmatch_accel.data import (
    channel_stats,
    labeled_examples,
    labeled_split,
    load_data,
    load_digits_dataset,
    repeat_to_fill,
    save_labeled_split,
    select_labeled,
)
from fixmatch_accel.errors import UsageError


def test_select_labeled_is_balanced_and_deterministic():
    labels = [i % 4 for i in range(400)]
    a = select_labeled(labels, 40, 4, seed=1)
    assert len(a) == len(set(a)) == 40
    assert Counter(labels[i] for i in a) == {0: 10, 1: 10, 2: 10, 3: 10}
    assert a == select_labeled(labels, 40, 4, seed=1)
    assert a != select_labeled(labels, 40, 4, seed=2)


def test_select_labeled_rejects_impossible_requests():
    labels = [0] * 10 + [1] * 3
    with pytest.raises(UsageError, match="--num_labeled 5 is not a multiple of the number of classes"):
        select_labeled(labels, 5, 2, seed=0)
    with pytest.raises(UsageError, match="needs 4 examples of each class, but class 1 has only 3"):
        select_labeled(labels, 8, 2, seed=0)


def test_digits_dataset():
    ds = load_digits_dataset()
    assert len(ds["train"]) == 1347 and len(ds["test"]) == 450
    image = ds["train"][0]["image"]
    assert image.mode == "RGB" and image.size == (8, 8)
    assert ds["train"].features["label"].names == [str(d) for d in range(10)]
    # Stratified: every class appears in the test split in proportion.
    assert min(Counter(ds["test"]["label"]).values()) >= 43


def test_digits_are_scikit_learns_rows_and_split_without_importing_it():
    """The demo reads sklearn's CSV itself and a stored split; both must be what sklearn gives."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from fixmatch_accel.data.digits import digits_arrays

    digits = load_digits()
    images, target = digits_arrays()
    assert np.array_equal(images, digits.images) and np.array_equal(target, digits.target)
    train_idx, test_idx = train_test_split(np.arange(len(target)), test_size=0.25, stratify=target, random_state=0)
    ds = load_digits_dataset()
    expected = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    for split, idx in (("train", train_idx), ("test", test_idx)):
        assert ds[split]["label"] == digits.target[idx].tolist()
        for k in (0, 17, len(idx) - 1):
            assert np.array_equal(np.asarray(ds[split][int(k)]["image"])[..., 0], expected[idx[k]])
    probe = ("import sys; from fixmatch_accel.data import load_digits_dataset; load_digits_dataset(); "
             "print('sklearn' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_split_saved_and_reloaded(tmp_path):
    cfg = TrainConfig(dataset_name="digits", num_labeled=30, seed=3)
    data = load_data(cfg)
    assert data.image_column == "image" and data.label_column == "label" and data.eval_split == "test"
    idx = labeled_split(cfg, data)
    path = tmp_path / "labeled_split.json"
    save_labeled_split(str(path), idx, cfg, data)
    saved = json.loads(path.read_text())
    assert saved["indices"] == idx and saved["seed"] == 3
    assert set(saved["per_class"].values()) == {3}
    reused = TrainConfig(dataset_name="digits", labeled_split_file=str(path), seed=99)
    again = labeled_split(reused, data)
    assert again == idx
    save_labeled_split(str(tmp_path / "again.json"), again, reused, data)  # records who drew it, not today's seed
    assert json.loads((tmp_path / "again.json").read_text())["seed"] == 3


def test_bad_split_file(tmp_path):
    data = load_data(TrainConfig(dataset_name="digits"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"indices": [0, 99999]}')
    with pytest.raises(UsageError, match="--labeled_split_file .*indices must be integers in"):
        labeled_split(TrainConfig(labeled_split_file=str(bad)), data)
    with pytest.raises(UsageError, match="--labeled_split_file .*no such file"):
        labeled_split(TrainConfig(labeled_split_file=str(tmp_path / "missing.json")), data)
    bad.write_text('{"indices": [5, 0, 5, 1]}')
    with pytest.raises(UsageError, match="--labeled_split_file .*: index 5 appears more than once"):
        labeled_split(TrainConfig(labeled_split_file=str(bad)), data)
    bad.write_text('{"indices": [7, 0, 3]}')  # a hand-written file's order: the rows are read sorted
    assert labeled_split(TrainConfig(labeled_split_file=str(bad)), data) == [0, 3, 7]
    # a saved split whose indices hold other labels here: made for other data
    save_labeled_split(str(bad), [0, 3, 7], TrainConfig(dataset_name="digits"), data)
    record = json.loads(bad.read_text())
    assert labeled_split(TrainConfig(labeled_split_file=str(bad)), data) == [0, 3, 7]
    record["indices"] = [1, 3, 7]
    bad.write_text(json.dumps(record))
    with pytest.raises(UsageError, match="--labeled_split_file .*: its indices hold other labels in this data"):
        labeled_split(TrainConfig(labeled_split_file=str(bad)), data)


def test_columns_detected_on_cifar10(cifar10_path):
    data = load_data(TrainConfig(dataset_name=str(cifar10_path), max_train_samples=100, max_eval_samples=10))
    assert (data.image_column, data.label_column, data.eval_split) == ("img", "label", "test")
    assert data.class_names[0] == "airplane" and data.num_classes == 10
    assert len(data.train) == 100 and len(data.eval) == 10


def test_columns_named_explicitly(cifar10_path):
    with pytest.raises(UsageError, match="--image_column_name 'image': no such column \\(columns: img, label\\)"):
        load_data(TrainConfig(dataset_name=str(cifar10_path), image_column_name="image"))
    with pytest.raises(UsageError, match="--label_column_name 'img' holds"):
        load_data(TrainConfig(dataset_name=str(cifar10_path), label_column_name="img"))


def test_image_folders(tmp_path):
    write_image_folder(tmp_path / "train")
    write_image_folder(tmp_path / "val", per_class=2, seed=1)
    data = load_data(TrainConfig(train_dir=str(tmp_path / "train"), validation_dir=str(tmp_path / "val")))
    assert data.class_names == ["cat", "dog", "frog"]
    assert len(data.train) == 24 and len(data.eval) == 6 and data.eval_split == "validation"
    mean, std = channel_stats(data.train, data.image_column, 12)
    assert len(mean) == 3 and all(0.1 < m < 0.9 for m in mean) and all(s > 0.05 for s in std)


def test_missing_inputs_name_the_flag(tmp_path):
    with pytest.raises(UsageError, match="--train_dir .*no such folder"):
        load_data(TrainConfig(train_dir=str(tmp_path / "nope")))
    with pytest.raises(UsageError, match="--dataset_name .*no such folder"):
        load_data(TrainConfig(dataset_name=str(tmp_path / "nope")))
    with pytest.raises(UsageError, match="--eval_split 'dev': no such split \\(splits: train, test\\)"):
        load_data(TrainConfig(dataset_name="digits", eval_split="dev"))
    write_image_folder(tmp_path / "train")  # no eval split: a held-out part, unless it would be empty
    with pytest.raises(UsageError, match=r"--train_val_split 0.01: holds out no row of the 24 rows of --train_split "
                                         r"'train'; raise it, or name an eval split with --eval_split or "
                                         r"--validation_dir"):
        load_data(TrainConfig(train_dir=str(tmp_path / "train"), train_val_split=0.01))


def test_repeat_to_fill():
    assert repeat_to_fill([1, 2, 3], 2) == [1, 2, 3]
    assert repeat_to_fill([1, 2, 3], 7) == [1, 2, 3] * 3


def test_plain_integer_labels_become_classes(tmp_path):
    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage

    features = Features({"picture": Image(), "y": Value("int64")})
    for split, ys in (("train", [3, 7, 7, 3, 9, 9]), ("test", [9, 3])):
        images = [PILImage.new("RGB", (8, 8), (10 * y, 0, 0)) for y in ys]
        Dataset.from_dict({"picture": images, "y": ys}, features=features).to_parquet(
            str(tmp_path / f"{split}.parquet"))
    with pytest.raises(UsageError, match="found no ClassLabel columns among picture, y: "
                                         "name one with --label_column_name"):
        load_data(TrainConfig(dataset_name=str(tmp_path)))
    data = load_data(TrainConfig(dataset_name=str(tmp_path), label_column_name="y"))
    assert data.class_names == ["3", "7", "9"]
    assert data.train["y"] == [0, 1, 1, 0, 2, 2] and data.eval["y"] == [2, 0]


@pytest.mark.parametrize("streaming", [False, True])
def test_plain_string_labels_reach_the_labeled_rows_as_class_indices(tmp_path, streaming):
    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage

    features = Features({"picture": Image(), "species": Value("string")})
    for split, ys in (("train", ["zebra", "ant", "cow", "ant", "zebra", "cow"]), ("test", ["cow", "ant"])):
        images = [PILImage.new("RGB", (8, 8), (len(y), 0, 0)) for y in ys]
        Dataset.from_dict({"picture": images, "species": ys}, features=features).to_parquet(
            str(tmp_path / f"{split}.parquet"))
    cfg = TrainConfig(dataset_name=str(tmp_path), label_column_name="species", num_labeled=3, streaming=streaming)
    data = load_data(cfg)
    assert data.class_names == ["ant", "cow", "zebra"] and data.train_labels.tolist() == [2, 0, 1, 0, 2, 1]
    indices, rows, bad = labeled_examples(cfg, data, [0, 1, 2])
    # the loss takes these as targets: class indices, as in the label pass, never the raw strings
    assert indices == [0, 1, 2] and not bad and rows["species"] == [2, 0, 1]


@pytest.mark.parametrize("streaming", [False, True])
def test_validation_folder_classes_are_checked_against_train(tmp_path, streaming):
    write_image_folder(tmp_path / "train", per_class=2)
    # a validation folder deeper than train's (the builder then dropped every label) holding one class
    write_image_folder(tmp_path / "elsewhere" / "held_out" / "val", classes=("dog",), per_class=2)
    data = load_data(TrainConfig(train_dir=str(tmp_path / "train"), streaming=streaming,
                                 validation_dir=str(tmp_path / "elsewhere" / "held_out" / "val")))
    assert data.class_names == ["cat", "dog", "frog"] and data.eval_labels.tolist() == [1, 1]
    write_image_folder(tmp_path / "val", classes=("cat", "wolf"), per_class=2)
    with pytest.raises(UsageError, match=r"--validation_dir '.*val': class folder\(s\) wolf not in the train split, "
                                         r"whose classes are cat, dog, frog"):
        load_data(TrainConfig(train_dir=str(tmp_path / "train"), validation_dir=str(tmp_path / "val"),
                              streaming=streaming))
    (tmp_path / "train" / "owl").mkdir()  # no image: it would vanish from the model's classes
    (tmp_path / "train" / "owl" / "notes.txt").write_text("to do")
    with pytest.raises(UsageError, match=r"--train_dir '.*train': class folder\(s\) owl hold no images"):
        load_data(TrainConfig(train_dir=str(tmp_path / "train"), validation_dir=str(tmp_path / "val"),
                              streaming=streaming))
    write_image_folder(tmp_path / "one", classes=("cat",), per_class=2)
    with pytest.raises(UsageError, match=r"--train_dir '.*one' has 1 class\(es\) \(cat\); FixMatch needs at least 2"):
        load_data(TrainConfig(train_dir=str(tmp_path / "one"), validation_dir=str(tmp_path / "val"),
                              streaming=streaming))


def test_an_eval_label_the_train_split_lacks_is_an_error(tmp_path):
    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage

    features = Features({"picture": Image(), "y": Value("string")})
    for split, ys in (("train", ["ant", "cow", "ant"]), ("test", ["cow", "yak"])):
        images = [PILImage.new("RGB", (8, 8)) for _ in ys]
        Dataset.from_dict({"picture": images, "y": ys}, features=features).to_parquet(
            str(tmp_path / f"{split}.parquet"))
    with pytest.raises(UsageError, match=r"--eval_split 'test': class\(es\) yak not in the train split, "
                                         r"whose classes are ant, cow"):
        load_data(TrainConfig(dataset_name=str(tmp_path), label_column_name="y"))
    with pytest.raises(UsageError, match=r"--train_split 'train' \(its first 1 rows, --max_train_samples\) has 1 "
                                         r"class\(es\) \(ant\)"):
        load_data(TrainConfig(dataset_name=str(tmp_path), label_column_name="y", max_train_samples=1))


def _image_paths(ds, column="image"):
    return [value["path"] for value in ds[column]]


def test_no_eval_split_holds_out_a_seeded_stratified_part_of_train(tmp_path):
    write_image_folder(tmp_path / "train", per_class=20)
    cfg = TrainConfig(train_dir=str(tmp_path / "train"), num_labeled=6, seed=4)
    data = load_data(cfg)
    assert data.carve == {"fraction": 0.15, "seed": 4, "held_out": 9}
    assert data.eval_split == "train (15% held out, seed 4)" and data.num_train == 51 == len(data.train)
    assert np.bincount(data.eval_labels).tolist() == [3, 3, 3]  # stratified
    assert data.train_labels.tolist() == data.train["label"] and data.eval_labels.tolist() == data.eval["label"]
    held, kept = set(_image_paths(data.eval)), set(_image_paths(data.train))
    assert len(held) == 9 and not held & kept and len(held | kept) == 60  # never trained on
    assert "9 rows held out" in data.notes[0] and "the other 51" in data.notes[0]
    assert _image_paths(load_data(cfg).eval) == _image_paths(data.eval)  # seeded
    other = load_data(TrainConfig(train_dir=str(tmp_path / "train"), seed=5, train_val_split=0.3))
    assert other.carve["held_out"] == 18 and set(_image_paths(other.eval)) != held

    idx = labeled_split(cfg, data)  # positions among the rows left, saved with the hold-out
    save_labeled_split(str(tmp_path / "split.json"), idx, cfg, data)
    saved = json.loads((tmp_path / "split.json").read_text())
    assert saved["train_val_split"] == data.carve and saved["indices"] == idx
    assert labeled_split(TrainConfig(labeled_split_file=str(tmp_path / "split.json")), data) == idx
    with pytest.raises(UsageError, match=r"split.json': its indices count the train rows left with 9 eval rows held "
                                         r"out of the train split \(--train_val_split 0.15, --seed 4\), this run has "
                                         r"18 eval rows .*--seed 5\)"):
        labeled_split(TrainConfig(labeled_split_file=str(tmp_path / "split.json")), other)
    with pytest.raises(UsageError, match=r"class 'cat' has only 17, in the train rows left after holding out 9 for "
                                         r"evaluation \(--train_val_split 0.15\)"):
        labeled_split(TrainConfig(num_labeled=54), data)


def test_evaluating_on_the_train_split_is_noted(tmp_path):
    assert load_data(TrainConfig(dataset_name="digits")).notes == []
    data = load_data(TrainConfig(dataset_name="digits", eval_split="train"))
    assert data.carve is None and data.eval_split == "train" and len(data.eval) == data.num_train
    assert len(data.notes) == 1 and "evaluating on the training data (--eval_split 'train')" in data.notes[0]
    write_image_folder(tmp_path / "train")
    same = load_data(TrainConfig(train_dir=str(tmp_path / "train"), validation_dir=str(tmp_path / "train")))
    assert "evaluating on the training data (--validation_dir" in same.notes[0]


@pytest.mark.parametrize("name, dtype, values", [("label", "string", ["cow", "ant", "cow", "yak"]),
                                                 ("labels", "int32", [5, 2, 5, 9])])
def test_a_plain_column_named_label_or_labels_is_the_label_column(tmp_path, name, dtype, values):
    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage

    features = Features({"image": Image(), name: Value(dtype), "note": Value("string")})
    for split in ("train", "test"):
        images = [PILImage.new("RGB", (8, 8)) for _ in values]
        Dataset.from_dict({"image": images, name: values, "note": ["x"] * 4}, features=features).to_parquet(
            str(tmp_path / f"{split}.parquet"))
    data = load_data(TrainConfig(dataset_name=str(tmp_path)))
    assert data.label_column == name and data.class_names == sorted(map(str, set(values)), key=str)
    assert data.train_labels.tolist() == [1, 0, 1, 2]
    with pytest.raises(UsageError, match="--label_column_name 'image' holds"):  # a named column still wins
        load_data(TrainConfig(dataset_name=str(tmp_path), label_column_name="image"))


def test_a_float_column_named_label_is_not_taken(tmp_path):
    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage

    features = Features({"image": Image(), "label": Value("float32")})
    Dataset.from_dict({"image": [PILImage.new("RGB", (8, 8))] * 2, "label": [0.5, 1.5]}, features=features
                      ).to_parquet(str(tmp_path / "train.parquet"))
    with pytest.raises(UsageError, match="found no ClassLabel columns among image, label: name one with "
                                         "--label_column_name"):
        load_data(TrainConfig(dataset_name=str(tmp_path)))


@pytest.mark.parametrize("layout, found", [(("cat/indoor", "cat/outdoor", "dog"), "cat/indoor/0.png"),
                                           (("cat", "cat/sub0/deeper", "dog"), "cat/sub0/deeper/0.png")])
def test_nested_class_folders_are_refused_naming_one_path(tmp_path, layout, found):
    for folder in layout:
        write_image_folder(tmp_path / "train" / folder, classes=("",), per_class=2)
    write_image_folder(tmp_path / "val", classes=("cat", "dog"), per_class=1)
    (tmp_path / "val" / "dog" / ".hidden").mkdir()  # hidden folders are skipped, as the builder skips them
    write_image_folder(tmp_path / "val" / "dog" / ".hidden", classes=("x",), per_class=1)
    with pytest.raises(UsageError, match=rf"^--train_dir '.*train': images must sit directly in the class folders "
                                         rf"\(one subfolder per class, no deeper\), found {found}$"):
        load_data(TrainConfig(train_dir=str(tmp_path / "train"), validation_dir=str(tmp_path / "val")))
    with pytest.raises(UsageError, match=r"^--validation_dir '.*train': images must sit directly"):
        load_data(TrainConfig(train_dir=str(tmp_path / "val"), validation_dir=str(tmp_path / "train")))


def test_channel_stats_are_the_sampled_pixels_mean_and_std_and_leave_out_bad_images():
    """A black and a white image: every channel has mean 0.5 and (population) std 0.5; a corrupt file is listed,
    not counted. With random images, numpy's mean and std over the stacked pixels."""
    import io

    from datasets import Dataset
    from PIL import Image

    from fixmatch_accel.data.images import sampled_channel_stats, unreadable_in_sample

    def png(array):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    black, white = np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 255, np.uint8)
    rows = Dataset.from_dict({"img": [png(black), {"bytes": b"not an image", "path": None}, png(white)]})
    mean, std, bad = sampled_channel_stats(rows, "img", 4, rows=[0, 1, 2])
    assert mean == pytest.approx([0.5] * 3) and std == pytest.approx([0.5] * 3)
    assert [(row, name) for row, name, _ in bad] == [(1, "row 1")]
    assert [row for row, _, _ in unreadable_in_sample(rows, "img", [0, 1, 2])] == [1]

    images = np.random.default_rng(0).integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)
    mean, std, _ = sampled_channel_stats(Dataset.from_dict({"img": [png(a) for a in images]}), "img", 6, rows=range(5))
    pixels = images.astype(np.float64) / 255.0
    assert mean == pytest.approx(pixels.mean(axis=(0, 1, 2)), abs=1e-12)
    assert std == pytest.approx(pixels.std(axis=(0, 1, 2)), abs=1e-12)
