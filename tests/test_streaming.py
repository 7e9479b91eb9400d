"""Data at scale: streaming, exact sharding, decoding any image, skipping bad ones."""

import dataclasses
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT, accelerate_launch, run_train, write_image_folder
from PIL import Image

from fixmatch_accel.config import TrainConfig
from fixmatch_accel.data import BadImage, decode_image, labeled_examples, labeled_split, load_data, to_rgb
from fixmatch_accel.data.pipeline import build_loaders
from fixmatch_accel.data.streaming import batches_per_pass, cut_pieces, num_pieces, unlabeled_stream
from fixmatch_accel.errors import UsageError

SHARDS = (70, 50, 80)  # rows per parquet shard: 3 shards, which do not divide 2 processes


def write_sharded_parquet(root: Path, shard_sizes=SHARDS, eval_labels=None):
    """A hub-style parquet dataset: train in several shards, one test shard; 8x8 images, 3 classes."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["a", "b", "c"])})
    (root / "data").mkdir(parents=True)
    rng = np.random.default_rng(0)
    row = 0
    for s, n in enumerate(shard_sizes):
        images = [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(n)]
        labels = [(row + i) % 3 for i in range(n)]
        Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(
            str(root / "data" / f"train-{s:05d}-of-{len(shard_sizes):05d}.parquet"))
        row += n
    eval_labels = eval_labels or [i % 3 for i in range(12)]
    images = [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in eval_labels]
    Dataset.from_dict({"image": images, "label": eval_labels}, features=features).to_parquet(
        str(root / "data" / "test-00000-of-00001.parquet"))
    return root


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory):
    return write_sharded_parquet(tmp_path_factory.mktemp("sharded") / "ds")


def write_mixed_folder(root: Path, per_class=40, seed=0):
    """An image folder of every common mode (PNG and JPEG) and several sizes, plus a corrupt and a truncated file."""
    modes = ["RGB", "L", "RGBA", "P", "CMYK", "I;16", "LA", "1"]
    rng = np.random.default_rng(seed)
    for c, name in enumerate(("cat", "dog", "frog")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            w, h = 10 + i % 7, 12 + i % 5
            pixels = np.full((h, w, 3), 40 + 80 * c, np.uint8) + rng.integers(0, 40, (h, w, 3), dtype=np.uint8)
            image, mode = Image.fromarray(pixels), modes[i % len(modes)]
            if mode == "I;16":
                image = Image.fromarray(np.asarray(image.convert("L")).astype(np.uint16) * 256)
            else:
                image = image.convert(mode)
            image.save(root / name / (f"{i}.jpg" if mode == "CMYK" else f"{i}.png"))
    return root


def plant_bad_images(root: Path):
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 10)
    good = (root / "cat" / "0.png").read_bytes()
    (root / "cat" / "truncated.png").write_bytes(good[: len(good) // 2])


# ---- Pieces of a stream: hand-computed cases.

def test_cut_pieces_cover_every_position_once():
    pieces = cut_pieces(SHARDS, 200, 4)
    assert pieces[0] == ((0, 0, 50, 0),)
    assert pieces[1] == ((0, 50, 70, 0), (1, 0, 30, 70))
    assert pieces[2] == ((1, 30, 50, 70), (2, 0, 30, 120))
    assert pieces[3] == ((2, 30, 80, 120),)
    positions = [o + j for piece in pieces for _, a, b, o in piece for j in range(a, b)]
    assert positions == list(range(200))
    # A limit (--max_train_samples) cuts only the first positions.
    cut = [o + j for piece in cut_pieces(SHARDS, 90, 2) for _, a, b, o in piece for j in range(a, b)]
    assert cut == list(range(90))


def test_num_pieces_and_batches_per_pass():
    assert num_pieces(SHARDS, 200, world=2, workers=2) == 4  # 3 shards do not split over 2 processes: cut 4 pieces
    assert num_pieces([50] * 4, 200, world=2, workers=0) == 4  # the data's own shards when they split evenly
    assert num_pieces([25] * 8, 200, world=2, workers=2) == 8
    assert num_pieces([50] * 4, 200, world=2, workers=4) == 8  # one piece per worker at least
    assert num_pieces([100, 0, 0, 0], 100, world=1, workers=2) == 2  # shards cut short by a limit: equal pieces
    # Every worker batches its own pieces: the bound takes each worker's smallest share.
    assert batches_per_pass([50, 50, 50, 50], world=2, workers=2, batch_size=8) == 2 * (50 // 8)
    assert batches_per_pass([10, 50, 50, 50], world=2, workers=1, batch_size=8) == (10 + 50) // 8


# ---- Streaming and map-style agree.

def test_streaming_reads_the_same_labels_and_draws_the_same_split(parquet_dir):
    cfg = dict(dataset_name=str(parquet_dir), num_labeled=30, seed=4)
    mapped = load_data(TrainConfig(**cfg))
    streamed = load_data(TrainConfig(streaming=True, **cfg))
    assert streamed.streaming and not mapped.streaming
    assert streamed.shard_sizes == list(SHARDS) and streamed.num_train == mapped.num_train == 200
    assert (streamed.train_labels == mapped.train_labels).all() and streamed.class_names == mapped.class_names
    assert len(streamed.eval_labels) == len(mapped.eval_labels) == 12
    idx = labeled_split(TrainConfig(**cfg), mapped)
    assert idx == labeled_split(TrainConfig(streaming=True, **cfg), streamed)
    # The labeled rows held in memory are the very rows of the split.
    _, rows_m, _ = labeled_examples(TrainConfig(**cfg), mapped, idx)
    _, rows_s, _ = labeled_examples(TrainConfig(streaming=True, **cfg), streamed, idx)
    assert rows_s["label"] == rows_m["label"]
    assert [v["bytes"] for v in rows_s["image"]] == [v["bytes"] for v in rows_m["image"]]
    limited = load_data(TrainConfig(streaming=True, max_train_samples=100, **cfg))
    assert limited.shard_sizes == [70, 30, 0] and limited.num_train == 100


def test_one_process_stream_covers_the_split_each_pass_in_a_new_order(parquet_dir):
    data = load_data(TrainConfig(dataset_name=str(parquet_dir), streaming=True))
    stream, counts = unlabeled_stream(data.train, data.shard_sizes, 200, world=1, rank=0, workers=0, seed=0,
                                      buffer_size=16)
    assert sum(counts) == 200
    passes = []
    for epoch in (0, 1):
        stream.set_epoch(epoch)
        passes.append([row["__position"] for row in stream])
    assert sorted(passes[0]) == sorted(passes[1]) == list(range(200))
    assert passes[0] != passes[1] and passes[0] != list(range(200))
    excluded, counts = unlabeled_stream(data.train, data.shard_sizes, 200, world=1, rank=0, workers=0, seed=0,
                                        buffer_size=16, exclude=range(0, 200, 10))
    assert sum(counts) == 180 and sorted(r["__position"] for r in excluded) == [p for p in range(200) if p % 10]


@pytest.mark.parametrize("streaming", [False, True])
def test_unlabeled_excludes_labeled(parquet_dir, streaming):
    cfg = TrainConfig(dataset_name=str(parquet_dir), num_labeled=30, streaming=streaming,
                      unlabeled_excludes_labeled=True, per_device_train_batch_size=2, mu=5, dataloader_num_workers=0)
    data = load_data(cfg)
    idx, rows, _ = labeled_examples(cfg, data, labeled_split(cfg, data))
    accelerator = SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"))
    unlabeled = build_loaders(cfg, data, idx, rows, 8, 1, "accelerator", accelerator)["unlabeled"]
    unlabeled.set_epoch(0) if streaming else None
    seen = torch.cat([batch[-1] for batch in unlabeled]).tolist()
    assert not set(seen) & set(idx)
    assert len(seen) == len(set(seen)) == 170  # 200 - 30 labeled, in whole batches of 10
    with pytest.raises(UsageError, match="--unlabeled_excludes_labeled: all 200 train examples are labeled"):
        build_loaders(cfg, data, list(range(200)), rows, 8, 1, "accelerator", accelerator)  # every example labeled


def test_two_processes_evaluate_the_first_max_eval_samples_rows(tmp_path):
    """--max_eval_samples N on a stream of 4 pieces: the two processes' shares are the map-style first N."""
    from datasets.distributed import split_dataset_by_node

    stream = load_data(TrainConfig(dataset_name="digits", streaming=True, max_eval_samples=61))
    mapped = load_data(TrainConfig(dataset_name="digits", max_eval_samples=61))
    shares = [[r["label"] for r in split_dataset_by_node(stream.eval, rank=k, world_size=2)] for k in (0, 1)]
    assert len(shares[0]) + len(shares[1]) == 61
    assert shares[0] == list(mapped.eval_labels[0::2]) and shares[1] == list(mapped.eval_labels[1::2])
    assert list(stream.eval_labels) == list(mapped.eval_labels)


def test_two_processes_split_a_stream_exactly(tmp_path, parquet_dir):
    """Three shards over two processes with two workers each: disjoint, complete up to each worker's last batch."""
    out = tmp_path / "ids"
    cmd = [*accelerate_launch(), str(ROOT / "tests" / "loader_ids.py"), str(out), "--dataset_name", str(parquet_dir),
           "--streaming", "--image_size", "8", "--num_labeled", "30", "--per_device_train_batch_size", "2",
           "--mu", "2", "--dataloader_num_workers", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    for name in ("labeled", "unlabeled"):
        a, b = ranks[0][name], ranks[1][name]
        assert len(a) == len(b) and len(set(a)) == len(a) and not set(a) & set(b), name
    # 4 pieces of 50, one per worker; each worker drops the last partial batch of 4: 48 of 50 per piece.
    covered = set(ranks[0]["unlabeled"]) | set(ranks[1]["unlabeled"])
    assert len(covered) == 4 * 48 and covered <= set(range(200))
    assert set(ranks[0]["labeled"]) | set(ranks[1]["labeled"]) <= set(ranks[0]["labeled_idx"])




# ---- Any image, and bad ones.

@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "RGBA", "P", "PA", "CMYK", "1", "I;16", "I", "F"])
def test_every_mode_becomes_rgb_of_the_asked_size(mode):
    grey = np.arange(12 * 9, dtype=np.uint8).reshape(9, 12)
    if mode in ("I;16", "I", "F"):
        image = Image.fromarray(grey.astype(np.uint16) * 256).convert(mode) if mode != "I;16" \
            else Image.fromarray(grey.astype(np.uint16) * 256)
    else:
        image = Image.fromarray(np.stack([grey] * 3, -1)).convert(mode)
    out = to_rgb(image, 16)
    assert out.mode == "RGB" and out.size == (16, 16)
    if mode in ("L", "I;16", "I"):  # grey levels survive (16-bit scaled back to 8 bits)
        assert np.asarray(out).max() > 90


def test_bad_images_raise_bad_image(tmp_path):
    folder = write_mixed_folder(tmp_path / "f", per_class=2)
    plant_bad_images(folder)
    for path in (folder / "dog" / "broken.png", folder / "cat" / "truncated.png"):
        with pytest.raises(BadImage):
            decode_image({"bytes": None, "path": str(path)})
    assert decode_image({"bytes": (folder / "cat" / "0.png").read_bytes(), "path": None}).size == (10, 12)


@pytest.fixture(scope="module")
def mixed_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    plant_bad_images(write_mixed_folder(root / "train"))
    write_mixed_folder(root / "val", per_class=6, seed=1)
    (root / "val" / "frog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 10)
    return root


MIXED = ["--model", "small_cnn", "--num_labeled", "6", "--per_device_train_batch_size", "3", "--mu", "6",
         "--max_train_steps", "12", "--logging_steps", "4", "--checkpointing_steps", "0", "--eval_steps", "0",
         "--no-plots"]


@pytest.mark.parametrize("extra", [
    ["--augment_device", "accelerator", "--no-cache_decoded", "--dataloader_num_workers", "0"],
    ["--augment_device", "accelerator", "--cache_decoded", "--dataloader_num_workers", "0"],
    ["--augment_device", "cpu", "--streaming", "--dataloader_num_workers", "2"],
])
def test_bad_images_are_skipped_counted_and_reported(tmp_path, mixed_folders, extra):
    out = tmp_path / "run"
    result = run_train(["--train_dir", mixed_folders / "train", "--validation_dir", mixed_folders / "val",
                        "--output_dir", out, "--max_bad_image_fraction", "0.1", *MIXED, *extra])
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["resolved"]["image_size"] == 32  # sizes differ: the default side
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [(r["num_eval"], r["eval_skipped_images"]) for r in rows if "top1" in r][-1] == (18, 1)
    # 12 steps x 18 unlabeled images read the 122-image split about twice: both bad files, each pass.
    assert train_rows[-1]["skipped_images"] >= 2
    assert all(np.isfinite(r["loss"]) for r in train_rows)
    results = json.loads((out / "eval_results.json").read_text())
    assert results["skipped_train_images"] == train_rows[-1]["skipped_images"]
    assert results["num_eval"] == 18 and results["skipped_images"] == 1  # the broken eval image is left out
    assert "unreadable image" in result.stdout


@pytest.mark.parametrize("extra", [
    # decoding the train split up front (the in-memory cache) finds 2 bad of 128 read: over the default 1%
    ["--augment_device", "accelerator", "--cache_decoded"],
    # a stream finds them while training; its error reads the shard again to name the file
    ["--augment_device", "cpu", "--streaming"],
])
def test_too_many_bad_images_stop_with_a_named_file(tmp_path, mixed_folders, extra):
    result = run_train(["--train_dir", mixed_folders / "train", "--validation_dir", mixed_folders / "val",
                        "--output_dir", tmp_path / "run", "--dataloader_num_workers", "0", *extra, *MIXED])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("fixmatch-train: error:")]
    assert len(error) == 1 and "could not be decoded" in error[0] and "--max_bad_image_fraction 0.01" in error[0]
    assert "truncated.png" in error[0] or "broken.png" in error[0]


def test_a_bad_labeled_image_is_redrawn_in_its_class(tmp_path):
    folder = write_image_folder(tmp_path / "train", per_class=6)
    write_image_folder(tmp_path / "val", per_class=2)
    cfg = TrainConfig(train_dir=str(folder), validation_dir=str(tmp_path / "val"), num_labeled=15, seed=0)
    data = load_data(cfg)
    first = labeled_split(cfg, data)
    victim = first[0]
    Path(data.train[victim]["image"]["path"]).write_bytes(b"corrupt")
    idx, rows, bad = labeled_examples(cfg, load_data(cfg), first)
    assert [b[0] for b in bad] == [victim] and victim not in idx and len(idx) == 15
    assert sorted(np.bincount(rows["label"])) == [5, 5, 5]  # still class-balanced
    every = dataclasses.replace(cfg, num_labeled=18)  # all six of each class: the bad one cannot be replaced
    with pytest.raises(UsageError, match=r"needs 6 examples of each class, but class '(cat|dog|frog)' has only 5 "
                                         r"readable images \(1 left out, e.g. .*\(row \d+\): "):
        labeled_examples(every, data, labeled_split(every, load_data(every)))


# ---- Clear errors.

def test_streaming_errors_are_one_line(tmp_path, parquet_dir):
    with pytest.raises(UsageError, match="--num_labeled 300 needs 100 examples of each class, "
                                         "but class 'a' has only 67"):
        data = load_data(TrainConfig(dataset_name=str(parquet_dir), streaming=True))
        labeled_split(TrainConfig(num_labeled=300), data)
    with pytest.raises(UsageError, match=r"--train_split 'unlabeled': no such split \(splits: train, test\)"):
        load_data(TrainConfig(dataset_name=str(parquet_dir), streaming=True, train_split="unlabeled"))
    write_image_folder(tmp_path / "train")  # no eval split: nothing to hold out of a stream
    with pytest.raises(UsageError, match=r"^no 'validation' or 'test' split \(splits: train\) and --streaming cannot "
                                         r"hold out --train_val_split of a stream: name one with --eval_split or "
                                         r"give --validation_dir$"):
        load_data(TrainConfig(train_dir=str(tmp_path / "train"), streaming=True))
    with pytest.raises(UsageError, match="cannot be used with --streaming"):
        from fixmatch_accel.config import parse_args
        parse_args(["--dataset_name", "x", "--streaming", "--cache_decoded"])


@pytest.mark.parametrize("streaming", [False, True])
def test_label_outside_the_class_list(tmp_path, streaming):
    root = write_sharded_parquet(tmp_path / "ds", shard_sizes=(9,), eval_labels=[0, 1, -1])
    with pytest.raises(UsageError, match=r"--label_column_name 'label': split 'test' holds the value -1 \(row 2\), "
                                         r"outside the 3 classes 0..2"):
        load_data(TrainConfig(dataset_name=str(root), streaming=streaming))


@pytest.mark.parametrize("streaming", [False, True])
def test_image_folder_with_one_class(tmp_path, streaming):
    write_image_folder(tmp_path / "train", classes=("cat",))
    write_image_folder(tmp_path / "val", classes=("cat",))
    with pytest.raises(UsageError, match="--train_dir .*has 1 class\\(es\\) \\(cat\\); FixMatch needs at least 2"):
        load_data(TrainConfig(train_dir=str(tmp_path / "train"), validation_dir=str(tmp_path / "val"),
                              streaming=streaming))


def test_the_label_pass_of_a_parquet_stream_reads_only_the_label_column(parquet_dir, tmp_path):
    from fixmatch_accel.data.streaming import label_streams

    cfg = TrainConfig(dataset_name=str(parquet_dir), streaming=True)
    data = load_data(cfg)
    only = label_streams(cfg, "label", {"train": data.train, "test": data.eval})
    assert set(only) == {"train", "test"} and list(only["train"].features) == ["label"]
    assert [row["label"] for row in only["train"]] == data.train_labels.tolist()
    # An image folder's builder takes no column list: the pass falls back to whole rows.
    folder = write_image_folder(tmp_path / "train")
    assert label_streams(TrainConfig(train_dir=str(folder)), "label", {}) == {}
