"""The compiled CPU augmentation (fixmatch_accel/augment/augment_native.c) gives the tensor path's pixels.

The tensor path is the reference here: tests/test_augment.py holds it to timm's and PIL's ops.
"""
import logging
import shutil

import pytest
import torch

import fixmatch_accel.augment as A
from fixmatch_accel.augment import native, ops
from fixmatch_accel.augment import tensor as T

HAVE_CC = any(shutil.which(cc) for cc in ("cc", "gcc", "clang"))
pytestmark = pytest.mark.skipif(not HAVE_CC, reason="no C compiler on this machine")

# Arguments as timm / kekmodel hand them to PIL, edge values included.
ARGS = {
    "Identity": [None], "Invert": [None], "AutoContrast": [None], "Equalize": [None],
    "Posterize": [-1.0, 0.0, 1.0, 4.0, 7.0, 8.0, 9.0],
    "Solarize": [0.0, 1.0, 128.0, 230.0, 255.0, 256.0],
    "SolarizeAdd": [0.0, 1.0, 64.0, 110.0, 128.0],
    "Color": [0.0, 0.1, 0.55, 1.0, 1.37, 1.9, 2.5],
    "Contrast": [0.0, 0.1, 0.55, 1.0, 1.37, 1.9],
    "Brightness": [0.0, 0.1, 0.55, 1.0, 1.37, 1.9],
    "Sharpness": [0.0, 0.1, 0.55, 1.0, 1.37, 1.9],
    "Rotate": [-30.0, -13.7, -3.0, 0.0, 0.5, 12.3, 27.0, 30.0, 90.0, 180.0],
    "ShearX": [-0.3, -0.13, 0.0, 0.07, 0.21, 0.3],
    "ShearY": [-0.3, -0.13, 0.0, 0.07, 0.21, 0.3],
    "TranslateXRel": [-0.45, -0.2, 0.0, 0.031, 0.33, 0.45],
    "TranslateYRel": [-0.45, -0.2, 0.0, 0.031, 0.33, 0.45],
    "TranslateX": [-9.0, -3.0, 0.0, 2.0, 9.0],
    "TranslateY": [-9.0, -3.0, 0.0, 2.0, 9.0],
}
SHAPES = [(3, 32, 32), (1, 7, 9), (3, 2, 5), (3, 3, 3), (1, 1, 1)]


@pytest.fixture(scope="module")
def lib():
    lib = native.library()
    assert lib is not None, "a C compiler is here, so the compiled path must build"
    return lib


def images(shape, n, seed):
    """Random, low-contrast, constant and two-valued images: the point ops' edge cases."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g)
    q = n // 4
    x[q:2 * q] = x[q:2 * q] // 5 + 100
    x[2 * q:2 * q + 1] = 77
    x[2 * q + 1:2 * q + 2] = torch.where(x[2 * q + 1:2 * q + 2] > 128, 200, 13).to(torch.uint8)
    return x


def test_the_args_cover_every_op_of_the_table():
    assert sorted(ARGS) == sorted(ops.BASE_OPS)


@pytest.mark.parametrize("name", sorted(ARGS))
def test_every_op_at_every_argument_gives_the_tensor_paths_pixels(name, lib):
    fill = torch.tensor([128, 0, 255], dtype=torch.uint8)
    resamples = ["bilinear", "nearest"] if name in ops.AFFINE_OPS else ["bilinear"]
    for shape in SHAPES:
        for resample in resamples:
            for k, value in enumerate(ARGS[name]):
                x = images(shape, 12, seed=k)
                n, c, h, w = x.shape
                arg = None if value is None else torch.full((n,), value, dtype=torch.float64)
                fill_c = fill[:c]
                expected = T._apply_one(x, name, arg, fill_c.view(1, c, 1, 1), resample)
                affine = torch.zeros(n, 6, dtype=torch.float64)
                if name in ops.AFFINE_OPS:
                    affine = T._affine_coeffs(name, arg, h, w)
                code = torch.full((n,), native.CODES[name], dtype=torch.int32)
                got = native.apply_layer(lib, x, torch.randperm(n), code,
                                         torch.zeros(n, dtype=torch.float64) if arg is None else arg,
                                         affine, fill_c, resample == "nearest")
                assert torch.equal(got, expected), (name, value, shape, resample)


@pytest.mark.parametrize("config", ["rand-m9-mstd0.5", "rand-m7-n3-mstd1-inc1", "paper", "rand-m10-mstd100"])
def test_rand_augment_compiled_equals_the_tensor_path_on_cifar_sized_batches(config, lib, monkeypatch):
    for seed, shape in enumerate([(3, 32, 32), (1, 11, 13)]):
        x = images(shape, 200, seed)
        g = torch.Generator().manual_seed(seed)
        params = A.sample_rand_augment_params(200, config, generator=g, image_size=shape[1:])
        compiled = A.apply_rand_augment(x, params, config)
        with monkeypatch.context() as m:
            m.setattr(native, "library", lambda: None)
            assert torch.equal(compiled, A.apply_rand_augment(x, params, config))
        assert not torch.equal(compiled, x)


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 9, 7), (3, 5, 5)])
def test_weak_batch_and_normalize_compiled_equal_the_tensor_path(shape, lib, monkeypatch):
    x = images(shape, 64, seed=1)
    for hflip, pad in [(True, 4), (False, 4), (True, 0), (False, 0), (True, 1)]:
        if pad >= min(shape[1:]):
            continue
        g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        compiled = A.weak_batch(x, hflip=hflip, pad=pad, generator=g1)
        with monkeypatch.context() as m:
            m.setattr(native, "library", lambda: None)
            tensor = A.weak_batch(x, hflip=hflip, pad=pad, generator=g2)
        assert torch.equal(compiled, tensor)
        assert torch.equal(g1.get_state(), g2.get_state())  # the same draws
    mean, std = (0.4914, 0.4822, 0.4465)[:shape[0]], (0.2471, 0.2435, 0.2616)[:shape[0]]
    compiled = A.normalize_batch(x, mean, std)
    with monkeypatch.context() as m:
        m.setattr(native, "library", lambda: None)
        tensor = A.normalize_batch(x, mean, std)
    assert compiled.dtype == torch.float32 and torch.equal(compiled, tensor)


def test_without_a_compiler_the_tensor_path_runs_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(native, "_loaded", False)
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert native.library() is None
    assert "no compiled CPU augmentation" in caplog.text and "no-such-cc" in caplog.text
    x = images((3, 16, 16), 32, seed=2)
    out = A.strong_batch(A.weak_batch(x, generator=torch.Generator().manual_seed(0)),
                         generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setattr(native, "_loaded", False)
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    assert native.library() is None


def test_a_build_is_reused_and_keyed_by_its_source(tmp_path, monkeypatch):
    first = native.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert native.build(tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary file left
    changed = tmp_path / "changed.c"
    changed.write_text(native.SOURCE.read_text() + "\n/* another version */\n")
    monkeypatch.setattr(native, "SOURCE", changed)
    assert native.build(tmp_path) != first


def test_a_broken_source_is_reported_with_the_compilers_words(tmp_path, monkeypatch):
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C;\n")
    monkeypatch.setattr(native, "SOURCE", broken)
    with pytest.raises(RuntimeError, match="failed: .*error"):
        native.build(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # the half-built file is gone


def test_a_source_without_a_case_of_the_op_table_is_refused(tmp_path, monkeypatch):
    """Op codes come from ops.OPS as -D definitions: a C case missing would copy those samples unchanged."""
    lacking = tmp_path / "lacking.c"
    lacking.write_text(native.SOURCE.read_text().replace("case OP_SHARPNESS:", ""))
    monkeypatch.setattr(native, "SOURCE", lacking)
    with pytest.raises(RuntimeError, match="has no case for OP_SHARPNESS$"):
        native.build(tmp_path / "cache")


def test_a_training_run_logs_the_same_losses_with_and_without_the_compiled_path(tmp_path):
    """The trainer's CPU views (labeled flip + crop, both unlabeled views, normalisation) through C
    and through tensor ops: the same images, so the same losses at every step."""
    import json

    from conftest import run_train
    from test_e2e import TINY_DIGITS

    def losses(env, name):
        out = tmp_path / name
        result = run_train(TINY_DIGITS + ["--max_train_steps", 6, "--logging_steps", 1, "--eval_steps", 0,
                                          "--checkpointing_steps", 0, "--augment_device", "accelerator",
                                          "--output_dir", out], env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r["loss_u"], r["mask_ratio"]) for r in rows if "loss" in r]

    compiled = losses({native.ENV_SWITCH: "1"}, "compiled")
    assert len(compiled) == 6
    assert compiled == losses({native.ENV_SWITCH: "0"}, "tensor")
