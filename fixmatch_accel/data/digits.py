"""The demo dataset: scikit-learn's bundled 8x8 digits, with a stored stratified split."""

import importlib.util
import json
from pathlib import Path
from typing import Tuple

import numpy as np
from PIL import Image as PILImage


def digits_arrays() -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: images [1797, 8, 8] (values 0..16) and labels.

    Read from the package's own CSV, as load_digits reads it, without importing scikit-learn:
    that import pulls in scipy, a slow start for every digits run (timing in bench/RESULTS.md).
    """
    spec = importlib.util.find_spec("sklearn")
    csv = (Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
           if spec is not None and spec.submodule_search_locations else None)
    if csv is None or not csv.is_file():  # another layout: ask scikit-learn itself
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.images, digits.target
    data = np.loadtxt(csv, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def load_digits_dataset():
    """scikit-learn's bundled 8x8 digits as a DatasetDict with a fixed stratified 25% test split.

    The split is scikit-learn's train_test_split(test_size=0.25, stratify=labels, random_state=0),
    stored in digits_split.json (tests/test_data.py recomputes it): the same rows and order
    whatever scikit-learn version is installed.
    """
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

    images, target = digits_arrays()
    pixels = np.round(images * (255.0 / 16.0)).astype(np.uint8)  # values 0..16 -> 0..255
    split = json.loads((Path(__file__).with_name("digits_split.json")).read_text())
    train_idx, test_idx = np.array(split["train"]), np.array(split["test"])
    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})

    def build(idx):
        images = [PILImage.fromarray(pixels[i]).convert("RGB") for i in idx]
        return Dataset.from_dict({"image": images, "label": target[idx].tolist()}, features=features)

    return DatasetDict(train=build(train_idx), test=build(test_idx))
