"""Images in a parquet file written with pyarrow, not with datasets: a struct {bytes, path} column (how datasets stores
images) or a binary column of encoded files are images; any other column is refused naming the types accepted."""

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from conftest import run_refused, run_train
from PIL import Image

from fixmatch_accel.config import parse_args
from fixmatch_accel.data import decode_image, load_data

TINY = ["--model", "small_cnn", "--image_size", "8", "--per_device_train_batch_size", "3", "--mu", "2",
        "--max_train_steps", "2", "--logging_steps", "1", "--checkpointing_steps", "0", "--num_labeled", "6",
        "--dataloader_num_workers", "0", "--no-plots"]


def encoded(label: int, rng) -> bytes:
    pixels = np.uint8(40 + 80 * label) + rng.integers(0, 40, (8, 8, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def write_plain_parquet(root: Path, per_class=8) -> Path:
    """train.parquet and test.parquet by pyarrow alone: `image` a struct {bytes, path: null}, `raw` the same bytes as
    a binary column, `name` a string column, `label` plain integers."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for split, n in (("train", per_class), ("test", 2)):
        labels = [i % 3 for i in range(3 * n)]
        data = [encoded(y, rng) for y in labels]
        pq.write_table(pa.table({
            "image": pa.array([{"bytes": b, "path": None} for b in data],
                              type=pa.struct([("bytes", pa.binary()), ("path", pa.null())])),
            "raw": pa.array(data, type=pa.binary()),
            "name": [f"{i}.png" for i in range(len(data))],
            "label": labels,
        }), root / f"{split}.parquet")
    return root


def test_a_struct_image_column_trains(tmp_path):
    data, out = write_plain_parquet(tmp_path / "pq"), tmp_path / "run"
    result = run_train(["--dataset_name", data, "--image_column_name", "image", "--output_dir", out] + TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["resolved"]["image_column"], cfg["resolved"]["num_train"]) == ("image", 24)


def test_a_binary_column_of_encoded_images_is_read(tmp_path):
    data = write_plain_parquet(tmp_path / "pq")
    split = load_data(parse_args(["--dataset_name", str(data), "--image_column_name", "raw"])[0])
    image = decode_image(split.train[0]["raw"])
    assert image.size == (8, 8) and split.num_train == 24


def test_other_columns_are_refused_naming_the_types_accepted(tmp_path):
    data = write_plain_parquet(tmp_path / "pq")
    (refused,) = run_refused([["--dataset_name", data, "--image_column_name", "name",
                               "--output_dir", tmp_path / "run"] + TINY], tmp_path)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == (
        "fixmatch-train: error: --image_column_name 'name' holds Value('string'), not images; accepted: an Image "
        "feature, a struct {bytes: binary, path: string} as datasets stores images (a plain parquet file's too), "
        "or a binary column of encoded image files (PNG, JPEG, ...)")
