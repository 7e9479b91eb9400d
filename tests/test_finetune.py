"""Fine-tuning a pretrained backbone: the model's preprocessing and gradient accumulation."""

import json
import sys

import pytest
import torch
from conftest import ROOT, run_train
from test_e2e import TINY_DIGITS, check_ok

from fixmatch_accel.augment import resize_batch
from fixmatch_accel.config import TrainConfig, resolve

MODEL_DATA = dict(input_size=[3, 224, 224], interpolation="bicubic", mean=[0.5] * 3, std=[0.5] * 3)


def resolved(cfg=None, native=32, **kw):
    cfg = cfg or TrainConfig(dataset_name="x")
    return resolve(cfg, device_type="cuda", dataset_image_size=lambda: native, num_train=50_000, streaming=False,
                   dataset_native_size=lambda: native, **kw)


def test_a_pretrained_model_sets_the_image_size_and_small_images_are_enlarged_on_the_device():
    r = resolved(model_data=MODEL_DATA)
    # views at the model's 224 px (crop padding an eighth of it); decoded and cached at the dataset's 32 px
    assert (r.image_size, r.load_size, r.interpolation, r.crop_padding, r.cache_decoded) == (224, 32, "bicubic",
                                                                                             28, True)
    r = resolved(TrainConfig(dataset_name="x", image_size=64), model_data=MODEL_DATA)
    assert (r.image_size, r.load_size) == (64, 32)  # --image_size overrides the model's size
    r = resolved(TrainConfig(dataset_name="x", augment_device="cpu"), model_data=MODEL_DATA)
    assert (r.image_size, r.load_size, r.interpolation) == (224, 224, "bilinear")  # PIL resizes in the workers
    r = resolved(native=256, model_data=MODEL_DATA)
    assert (r.image_size, r.load_size, r.interpolation) == (224, 224, "bilinear")  # larger images: PIL shrinks them
    r = resolved()  # random init: the dataset's size, as before
    assert (r.image_size, r.load_size, r.interpolation) == (32, 32, "bilinear")


def test_resize_batch_enlarges_uint8_batches():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4).to(torch.uint8)
    assert resize_batch(x, 4) is x
    assert torch.equal(resize_batch(x, 8, "nearest"), x.repeat_interleave(2, -1).repeat_interleave(2, -2))
    up = resize_batch(x, 8, "bicubic")
    assert up.dtype == torch.uint8 and up.shape == (2, 3, 8, 8)
    flat = torch.full((1, 3, 5, 5), 77, dtype=torch.uint8)
    assert torch.equal(resize_batch(flat, 9, "bicubic"), torch.full((1, 3, 9, 9), 77, dtype=torch.uint8))
