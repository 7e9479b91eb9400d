"""Tests for fixmatch_accel.augment: both paths, fidelity to timm's PIL ops, distributions."""
import io
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import timm.data.auto_augment as timm_aa
import torch
from PIL import Image

from fixmatch_accel import augment as A
from fixmatch_accel.augment import native, ops, pil
from fixmatch_accel.augment import tensor as T

CIFAR = (Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
         / "train-00000-of-00001.parquet")


# ---------------------------------------------------------------------------- fixtures

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add overhead (300x on a loaded 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cifar_batch(n: int = 64) -> torch.Tensor:
    if not CIFAR.exists():
        pytest.skip(f"shared CIFAR-10 not found at {CIFAR}")
    import pyarrow.parquet as pq

    rows = pq.read_table(CIFAR, columns=["img"]).slice(0, n).column("img").to_pylist()
    imgs = [np.asarray(Image.open(io.BytesIO(r["bytes"])).convert("RGB")) for r in rows]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()


def _synthetic_batch(n: int = 32, size: int = 32) -> torch.Tensor:
    """Half uniform noise (worst case for interpolation), half smooth random blobs."""
    g = torch.Generator().manual_seed(1234)
    noise = torch.randint(0, 256, (n // 2, 3, size, size), generator=g, dtype=torch.uint8)
    low = torch.rand(n - n // 2, 3, 4, 4, generator=g) * 255
    smooth = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear",
                                             align_corners=False).round().to(torch.uint8)
    return torch.cat([noise, smooth])


BATCHES = {
    "cifar": lambda: _cifar_batch(),
    "synthetic": lambda: _synthetic_batch(),
    "cifar_gray": lambda: _to_gray(_cifar_batch(32)),
    "synthetic_gray": lambda: _to_gray(_synthetic_batch()),
}


def _to_gray(x: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(p)) for p in _pil(x, "L")]).unsqueeze(1)


def _pil(x: torch.Tensor, mode: str = "RGB") -> list:
    arr = x.permute(0, 2, 3, 1).numpy()
    if mode == "L" or x.shape[1] == 1:
        if x.shape[1] == 1:
            return [Image.fromarray(a[..., 0], "L") for a in arr]
        return [Image.fromarray(a, "RGB").convert("L") for a in arr]
    return [Image.fromarray(a, "RGB") for a in arr]


def _from_pil(imgs: list) -> torch.Tensor:
    arrs = [np.asarray(i) for i in imgs]
    arrs = [a[..., None] if a.ndim == 2 else a for a in arrs]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------- config parsing

@pytest.mark.parametrize("config", [
    "rand-m9-mstd0.5", "rand-m9-mstd0.5-inc1", "rand-m7-n3-p0.3", "rand-mstd101",
    "rand-m15-mmax20-mstd1", "rand-n1", "rand-m5-mstd0", "rand-m12",
])
def test_parse_matches_timm(config):
    spec = A.parse_strong_augment(config)
    ra = timm_aa.rand_augment_transform(config, hparams=dict(timm_aa._HPARAMS_DEFAULT))
    op = ra.ops[0]
    assert spec.ops == tuple(o.name for o in ra.ops)
    assert spec.num_layers == ra.num_layers
    assert spec.prob == op.prob and spec.magnitude == op.magnitude
    assert spec.magnitude_std == op.magnitude_std
    assert spec.magnitude_max == (op.magnitude_max or 10)


def test_op_lists_match_timm():
    assert A.RAND_OPS == tuple(timm_aa._RAND_TRANSFORMS)
    assert A.RAND_INCREASING_OPS == tuple(timm_aa._RAND_INCREASING_TRANSFORMS)


@pytest.mark.parametrize("config", ["", "foo", "rand-x9", "rand-m9x", "rand-m9.5",
                                    "rand-tweights", "rand--m9", "Paper", "rand-m9-"])
def test_bad_config_raises_value_error(config):
    for make in (lambda: A.parse_strong_augment(config),
                 lambda: A.strong_transform(32, config),
                 lambda: A.strong_batch(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), config=config)):
        with pytest.raises(ValueError, match="--strong_augment") as err:
            make()
        assert repr(config) in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------- weak, tensor path

def _coordinate_images(n: int, size: int) -> torch.Tensor:
    """Channel 0 = row index, channel 1 = column index: recovers offsets and flips."""
    r = torch.arange(size).view(size, 1).expand(size, size)
    c = torch.arange(size).view(1, size).expand(size, size)
    return torch.stack([r, c, r + c]).to(torch.uint8).expand(n, 3, size, size).contiguous()


def _recover_crop(out: torch.Tensor, pad: int):
    """(oy, ox, flipped) per sample, read at output position 2*pad (inside the source)."""
    size = out.shape[-1]
    src_row = out[:, 0, 2 * pad, 0].long()
    cols = out[:, 1, 0, 2 * pad: 2 * pad + 2].long()
    flipped = cols[:, 1] < cols[:, 0]
    src_col = torch.where(flipped, size - 1 - cols[:, 0], cols[:, 0])
    return src_row - pad, src_col - pad, flipped


def test_weak_batch_matches_pad_crop_flip_reference():
    n, size, pad = 400, 16, 4
    x = _synthetic_batch(n, size)
    out = A.weak_batch(x, pad=pad, generator=_gen(0))
    oy, ox, flipped = _recover_crop(A.weak_batch(_coordinate_images(n, size), pad=pad,
                                                 generator=_gen(0)), pad)
    assert out.shape == x.shape and out.dtype == torch.uint8 and out.device == x.device
    flip_x = torch.where(flipped.view(n, 1, 1, 1), x.flip(-1), x)
    padded = torch.nn.functional.pad(flip_x.float(), (pad,) * 4, mode="reflect")
    for i in range(n):  # reference only; the implementation has no per-sample loop
        ref = padded[i, :, oy[i]: oy[i] + size, ox[i]: ox[i] + size].to(torch.uint8)
        assert torch.equal(out[i], ref)


def test_weak_batch_distribution():
    n, size, pad = 9000, 16, 4  # recovery needs 3 * pad < size
    oy, ox, flipped = _recover_crop(A.weak_batch(_coordinate_images(n, size), pad=pad,
                                                 generator=_gen(1)), pad)
    assert abs(flipped.float().mean().item() - 0.5) < 4 * (0.25 / n) ** 0.5
    for offsets in (oy, ox):
        counts = torch.bincount(offsets, minlength=2 * pad + 1)
        assert len(counts) == 2 * pad + 1  # offsets cover exactly 0..8
        expected, sigma = n / 9, (n / 9 * 8 / 9) ** 0.5
        assert (counts - expected).abs().max() < 4.5 * sigma, counts
    # flip-only: pad=0 keeps every pixel in its row, mirrored or not
    x = _synthetic_batch(64, 16)
    out = A.weak_batch(x, pad=0, generator=_gen(2))
    same, mirrored = (out == x).flatten(1).all(1), (out == x.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all() and 10 < mirrored.sum() < 54
    # crop-only: never mirrored
    _, _, flipped = _recover_crop(A.weak_batch(_coordinate_images(200, size), pad=pad,
                                               hflip=False, generator=_gen(3)), pad)
    assert not flipped.any()


@pytest.mark.parametrize("in_graph", [False, True])
def test_the_strong_view_gets_a_flip_and_crop_of_its_own(in_graph):
    """The trainer's strong view is RandAugment on a flip + crop drawn apart from the weak
    view's (as PIL's strong transform does), not RandAugment on the weak view itself."""
    from fixmatch_accel.step import unlabeled_batch_views

    n, size, pad, config = 3000, 16, 4, "rand-m9-mstd0.5-p0"  # p0: RandAugment changes nothing
    u_w, strong = unlabeled_batch_views(_coordinate_images(n, size), config, in_graph=in_graph,
                                        generator=_gen(7), pad=pad)
    u_s = A.apply_rand_augment(*strong, config) if in_graph else strong
    weak_crop, strong_crop = _recover_crop(u_w, pad), _recover_crop(u_s, pad)  # (oy, ox, flipped) each
    for offsets in strong_crop[:2]:
        assert torch.equal(torch.unique(offsets), torch.arange(2 * pad + 1))
    same = (weak_crop[0] == strong_crop[0]) & (weak_crop[1] == strong_crop[1]) & (weak_crop[2] == strong_crop[2])
    expected = n / (9 * 9 * 2)  # independent draws: 1 in 162 samples agree by chance
    assert abs(same.sum().item() - expected) < 4.5 * expected ** 0.5, same.sum()
    flips_agree = (weak_crop[2] == strong_crop[2]).float().mean().item()
    assert abs(flips_agree - 0.5) < 4 * (0.25 / n) ** 0.5


def test_weak_batch_identity_and_determinism():
    x = _synthetic_batch(16, 32)
    assert torch.equal(A.weak_batch(x, hflip=False, pad=0), x)
    a = A.weak_batch(x, generator=_gen(5))
    assert torch.equal(a, A.weak_batch(x, generator=_gen(5)))
    assert not torch.equal(a, A.weak_batch(x, generator=_gen(6)))
    gray = x[:, :1].contiguous()
    assert A.weak_batch(gray, generator=_gen(5)).shape == gray.shape
    with pytest.raises(ValueError):
        A.weak_batch(x.float())


def test_normalize_batch_matches_cpu_helper():
    x = _synthetic_batch(4, 8)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
    out = A.normalize_batch(x, mean, std)
    ref = torch.stack([A.to_tensor_normalize(mean, std)(p) for p in _pil(x)])
    assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=1e-5)


# --------------------------------------------------------- fidelity: tensor ops vs timm

# Per-op tolerance on the mean absolute pixel difference (0..255 scale) against timm's
# AugmentOp (bilinear, fill 128); max |diff| <= 1 everywhere. Lookup-table ops are exact.
# Float ops mirror PIL's arithmetic (double for arguments, coordinates and weights, C float
# for blends) and measured exact on CIFAR and synthetic images, except Rotate: about one
# pixel in 40 images differs by one at 30 degrees (mean 4e-5), which we could not trace.
# The slack on float ops (~0.2% of pixels off by one) covers other CPUs' libm and SIMD.
EXACT, FLOAT = 0.0, 0.002
TOLERANCE = {
    "AutoContrast": EXACT, "Equalize": EXACT, "Invert": EXACT, "Posterize": EXACT,
    "PosterizeIncreasing": EXACT, "Solarize": EXACT, "SolarizeIncreasing": EXACT,
    "SolarizeAdd": EXACT, "Color": FLOAT, "ColorIncreasing": FLOAT, "Contrast": FLOAT,
    "ContrastIncreasing": FLOAT, "Brightness": FLOAT, "BrightnessIncreasing": FLOAT,
    "Sharpness": FLOAT, "SharpnessIncreasing": FLOAT, "Rotate": FLOAT, "ShearX": FLOAT,
    "ShearY": FLOAT, "TranslateXRel": FLOAT, "TranslateYRel": FLOAT,
}
SIGNED = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "ColorIncreasing",
          "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing")


def _timm_reference(imgs: list, name: str, magnitude: float, sign: int,
                    monkeypatch) -> torch.Tensor:
    """timm's AugmentOp (prob 1, fixed magnitude, bilinear, fill 128) with a fixed sign."""
    monkeypatch.setattr(timm_aa, "_randomly_negate", lambda v: -v if sign < 0 else v)
    gray = imgs[0].mode == "L"
    hparams = dict(img_mean=128 if gray else (128, 128, 128), interpolation=Image.BILINEAR)
    op = timm_aa.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)
    if op.aug_fn is timm_aa.posterize:
        op.aug_fn = pil.posterize  # Pillow 13 raises on bits=0; the CPU path uses this too
    return _from_pil([op(img) for img in imgs])


def _tensor_op(x: torch.Tensor, name: str, magnitude: float, sign: int) -> torch.Tensor:
    """The tensor path's RandAugment layer with every draw forced to (name, magnitude, sign)."""
    n = x.shape[0]
    spec = A.StrongAugmentSpec(ops=(name,), num_layers=1, magnitude=magnitude, prob=1.0)
    params = A.RandAugmentParams(
        op=torch.zeros(n, 1, dtype=torch.long), applied=torch.ones(n, 1, dtype=torch.bool),
        magnitude=torch.full((n, 1), float(magnitude)), sign=torch.full((n, 1), float(sign)),
        cutout_center=None)
    return A.apply_rand_augment(x, params, spec, fill=128)


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("name", sorted(TOLERANCE))
def test_op_matches_timm(name, batch, monkeypatch):
    x = BATCHES[batch]()
    imgs = _pil(x)
    for magnitude in (0, 2, 5, 9, 10):
        for sign in ((1, -1) if name in SIGNED else (1,)):
            ref = _timm_reference(imgs, name, magnitude, sign, monkeypatch)
            out = _tensor_op(x, name, magnitude, sign)
            diff = (out.int() - ref.int()).abs()
            where = f"{name} m={magnitude} sign={sign} on {batch}"
            assert diff.float().mean() <= TOLERANCE[name], (where, diff.float().mean())
            assert diff.max() <= 1, where


def test_level_to_arg_matches_timm(monkeypatch):
    mags = torch.arange(0, 20.25, 0.25)
    for name in set(A.RAND_OPS + A.RAND_INCREASING_OPS) - {"AutoContrast", "Equalize", "Invert"}:
        for sign in (1, -1):
            monkeypatch.setattr(timm_aa, "_randomly_negate", lambda v, sign=sign: -v if sign < 0 else v)
            ref = [timm_aa.LEVEL_TO_ARG[name](float(m), {})[0] for m in mags]
            _, arg = ops.timm_level_to_arg(name, mags, torch.full_like(mags, sign))
            assert torch.allclose(arg.double(), torch.tensor(ref, dtype=torch.float64),
                                  rtol=1e-6, atol=1e-6), name


# Paper ops against this module's PIL implementation of kekmodel's pool (nearest sampling
# in PIL's 16.16 fixed point): measured exact; same slack as above for float ops.
PAPER_TOLERANCE = {name: TOLERANCE.get(name, FLOAT) for name in A.PAPER_OPS}


@pytest.mark.parametrize("name", A.PAPER_OPS)
def test_paper_ops_match_pil(name):
    real = _cifar_batch(16) if CIFAR.exists() else _synthetic_batch(32)[16:]  # smooth half
    x = torch.cat([_synthetic_batch(16), real])
    imgs = _pil(x)
    n = x.shape[0]
    for v in range(1, 11):
        for negate in (False, True):
            ref = _from_pil([pil.paper_op(img, name, v, negate, (128,) * 3) for img in imgs])
            base, arg = ops.paper_level_to_arg(  # float64, as apply_rand_augment on CPU
                name, torch.full((n,), float(v), dtype=torch.float64),
                torch.full((n,), -1.0 if negate else 1.0, dtype=torch.float64), 32, 32)
            out = A.apply_op(x, base, arg, fill=128, resample="nearest")
            diff = (out.int() - ref.int()).abs().float()
            assert diff.mean() <= PAPER_TOLERANCE[name], (name, v, negate, diff.mean())
            assert diff.max() <= 1, (name, v, negate)


# ------------------------------------------------------------ strong, tensor path

@pytest.mark.parametrize("config", ["rand-m9-mstd0.5", "rand-m9-mstd0.5-inc1", "paper",
                                    "rand-m15-mmax20-n3-p1.0"])
def test_strong_batch_shape_dtype_determinism(config):
    x = _synthetic_batch(32, 32)
    out = A.strong_batch(x, config=config, generator=_gen(0))
    assert out.shape == x.shape and out.dtype == torch.uint8 and out.device == x.device
    assert torch.equal(out, A.strong_batch(x, config=config, generator=_gen(0)))
    assert not torch.equal(out, A.strong_batch(x, config=config, generator=_gen(1)))
    gray = x[:, :1].contiguous()
    assert A.strong_batch(gray, config=config, generator=_gen(0)).shape == gray.shape


def test_strong_batch_on_meta_device_keeps_device():
    x = torch.empty(4, 3, 32, 32, dtype=torch.uint8, device="meta")
    for config in ("rand-m9-mstd0.5", "paper"):
        out = A.strong_batch(x, config=config)
        assert out.device.type == "meta" and out.shape == x.shape and out.dtype == torch.uint8
    assert A.weak_batch(x).device.type == "meta"


def test_samples_get_different_ops():
    x = _synthetic_batch(2, 32)[1:].expand(64, 3, 32, 32).contiguous()  # one image, 64 times
    out = A.strong_batch(x, generator=_gen(3))
    assert len({bytes(o.numpy().tobytes()) for o in out}) > 30
    params = A.sample_rand_augment_params(64, generator=_gen(3))
    assert params.op[:, 0].unique().numel() > 10


def test_strong_batch_equals_sample_then_apply():
    x = _synthetic_batch(16, 32)
    for config in ("rand-m9-mstd0.5", "paper"):
        params = A.sample_rand_augment_params(16, config, generator=_gen(7), image_size=(32, 32))
        assert torch.equal(A.apply_rand_augment(x, params, config),
                           A.strong_batch(x, config=config, generator=_gen(7)))


def test_mixed_batch_matches_per_sample_ops():
    """Each sample's result equals applying its own two ops alone (selection is per sample)."""
    x = _synthetic_batch(32, 32)
    spec = A.parse_strong_augment("rand-m9-mstd0.5")
    params = A.sample_rand_augment_params(32, spec, generator=_gen(11))
    params = params._replace(applied=torch.ones_like(params.applied))
    out = A.apply_rand_augment(x, params, spec)
    for i in range(32):
        y = x[i:i + 1]
        for layer in range(2):
            name = spec.ops[params.op[i, layer]]
            y = _tensor_op(y, name, params.magnitude[i, layer].item(), params.sign[i, layer].item())
        assert torch.equal(out[i:i + 1], y), i


# ------------------------------------------------------ distributions vs timm

def _timm_draws(config: str, n_images: int, seed: int = 0):
    """Run timm's real RandAugment with recording ops: per image, the applied (name, magnitude)."""
    random.seed(seed)
    np.random.seed(seed)
    ra = timm_aa.rand_augment_transform(config, hparams=dict(timm_aa._HPARAMS_DEFAULT))
    log = []
    for op in ra.ops:
        level_fn = op.level_fn

        def record(magnitude, hparams, name=op.name, level_fn=level_fn):
            log.append((name, magnitude))
            return level_fn(magnitude, hparams) if level_fn else ()

        op.level_fn = record
        op.aug_fn = lambda img, *a, **k: img
    per_image = []
    for _ in range(n_images):
        start = len(log)
        ra(None)
        per_image.append(len(log) - start)
    names = [n for n, _ in log]
    return names, np.array([m for _, m in log]), np.array(per_image)


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    grid = np.sort(np.concatenate([a, b]))
    ca = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(ca - cb).max())


@pytest.mark.parametrize("config", ["rand-m9-mstd0.5", "rand-m9-mstd101", "rand-m7-n3-p0.3",
                                    "rand-m15-mmax20-mstd1-inc1"])
def test_distribution_matches_timm(config):
    n = 20000
    spec = A.parse_strong_augment(config)
    p = A.sample_rand_augment_params(n, spec, generator=_gen(0))
    t_names, t_mag, t_per_image = _timm_draws(config, n)
    # ops: uniform over the op list, independent of the apply flag
    counts = torch.bincount(p.op.flatten(), minlength=len(spec.ops)).numpy()
    expected = n * spec.num_layers / len(spec.ops)
    sigma = (expected * (1 - 1 / len(spec.ops))) ** 0.5
    assert np.abs(counts - expected).max() < 4.5 * sigma, counts
    t_counts = np.array([t_names.count(o) for o in spec.ops])
    ours = np.bincount(p.op[p.applied].numpy(), minlength=len(spec.ops))
    assert np.abs(ours / ours.sum() - t_counts / t_counts.sum()).max() < 0.012
    # apply flags: ops per image ~ Binomial(num_layers, prob), as timm
    per_image = p.applied.sum(1).numpy()
    assert abs(per_image.mean() - spec.num_layers * spec.prob) < 0.03
    assert abs(per_image.mean() - t_per_image.mean()) < 0.04
    assert abs(per_image.var() - t_per_image.var()) < 0.05
    # magnitudes: same noise, same clipping
    mag = p.magnitude[p.applied].numpy()
    assert _ks(mag, t_mag) < 0.025
    assert abs(mag.mean() - t_mag.mean()) < 0.05 and abs(mag.std() - t_mag.std()) < 0.05
    assert mag.min() >= 0 and mag.max() <= spec.magnitude_max
    assert abs(np.mean(mag == spec.magnitude_max) - np.mean(t_mag == spec.magnitude_max)) < 0.01
    assert abs((p.sign < 0).float().mean().item() - 0.5) < 0.02


def test_default_magnitude_is_clipped_gauss_9_half():
    p = A.sample_rand_augment_params(20000, "rand-m9-mstd0.5", generator=_gen(4))
    m = p.magnitude.flatten()
    ref = (9 + 0.5 * torch.randn(200000, generator=_gen(5))).clamp(0, 10)
    assert abs(m.mean() - ref.mean()) < 0.01 and abs(m.std() - ref.std()) < 0.01
    assert m.max() == 10 and abs((m == 10).float().mean() - 0.0228) < 0.004


# ------------------------------------------------------------------- paper

def test_paper_magnitudes_on_the_pil_path(monkeypatch):
    """The PIL path (DataLoader workers) draws the paper's magnitudes 1..9 too, as the tensor and C paths do."""
    drawn = []
    monkeypatch.setattr(pil, "paper_op", lambda img, name, v, negate, fill: drawn.append(v) or img)
    random.seed(0)
    ra, img = pil.PaperRandAugment(), Image.new("RGB", (8, 8))
    for _ in range(2000):
        ra(img)
    assert set(drawn) == set(range(1, 10))


def test_paper_params_and_cutout():
    n, size, fill = 2000, 32, 200
    p = A.sample_rand_augment_params(n, "paper", generator=_gen(0), image_size=(size, size))
    m = p.magnitude
    # 1..9, as google-research/fixmatch and kekmodel draw them (np.random.randint(1, 10))
    assert torch.equal(m, m.round()) and m.min() == 1 and m.max() == 9
    counts = torch.bincount(m.long().flatten(), minlength=10)[1:]
    assert (counts - 4000 / 9).abs().max() < 4.5 * (4000 / 9 * 8 / 9) ** 0.5
    assert p.op.max() == len(A.PAPER_OPS) - 1 and abs(p.applied.float().mean() - 0.5) < 0.03
    # Images that never contain `fill` (values 0..100); the cutout must be exactly a
    # 16px square of fill at the drawn centre, clipped; outside it only ops can write fill.
    x = (torch.arange(size * size) % 101).to(torch.uint8).view(1, 1, size, size).expand(
        64, 3, size, size).contiguous()
    out = A.strong_batch(x, config="paper", generator=_gen(9), fill=fill)
    centre = A.sample_rand_augment_params(64, "paper", generator=_gen(9),
                                          image_size=(size, size)).cutout_center
    rows, cols = torch.arange(size).view(size, 1), torch.arange(size).view(1, size)
    for i in range(64):
        cy, cx = centre[i].tolist()
        square = ((rows >= cy - 8) & (rows < cy + 8) & (cols >= cx - 8) & (cols < cx + 8))
        assert (out[i][:, square] == fill).all()
        side_y = min(size, cy + 8) - max(0, cy - 8)
        assert square.sum() == side_y * (min(size, cx + 8) - max(0, cx - 8))
    # with every op switched off, the fill pixels are exactly the square
    none = p._replace(applied=torch.zeros_like(p.applied))
    out = A.apply_rand_augment(x[:1].expand(n, 3, size, size), none, "paper", fill=fill)
    cy, cx = p.cutout_center[:, 0].view(n, 1, 1), p.cutout_center[:, 1].view(n, 1, 1)
    square = (rows >= cy - 8) & (rows < cy + 8) & (cols >= cx - 8) & (cols < cx + 8)
    assert torch.equal(out[:, 0] == fill, square)


# ------------------------------------------------------------------- torch.compile

def test_apply_rand_augment_compiles_fullgraph_with_inductor_to_the_eager_pixels():
    """Compile the (heavy) apply step with inductor, every op applied to some sample: no graph
    break and the very pixels of eager CPU. The images span less than 0..255 per channel, so
    AutoContrast and Equalize depend on true minima and maxima (inductor's CPU uint8 amin once
    returned 0 for a minimum of 12, a check with full-range images did not see)."""
    torch._dynamo.reset()
    n_ops = len(A.RAND_OPS)
    x = (_synthetic_batch(2 * n_ops, 16)[n_ops:].float() * 0.75 + 20).to(torch.uint8)
    params = A.sample_rand_augment_params(n_ops, generator=_gen(0), image_size=(16, 16))
    params = params._replace(op=torch.stack([torch.arange(n_ops), params.op[:, 1]], 1),
                             applied=torch.tensor([[True, False]] * n_ops))
    compiled = torch.compile(A.apply_rand_augment, fullgraph=True)
    out = compiled(x, params)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    eager = A.apply_rand_augment(x, params)
    assert (out != eager).flatten(1).any(1).nonzero().flatten().tolist() == []
    changed = (eager != x).flatten(1).any(1)
    assert changed[0] and changed.sum() >= n_ops - 2  # AutoContrast and most others did something


@pytest.mark.parametrize("config", ["rand-m9-mstd0.5", "paper"])
def test_strong_and_weak_batch_trace_fullgraph(config):
    """With generator=None (compiled RNG) the whole step traces into one graph."""
    torch._dynamo.reset()

    def step(x):
        return A.strong_batch(A.weak_batch(x), config=config)

    out = torch.compile(step, fullgraph=True, backend="aot_eager")(_synthetic_batch(4, 16))
    assert out.dtype == torch.uint8 and out.shape == (4, 3, 16, 16)


# ------------------------------------------------------------------- CPU path

@pytest.mark.parametrize("config", ["rand-m9-mstd0.5", "rand-m9-mstd0.5-inc1", "paper"])
def test_cpu_transforms_return_pil_of_image_size(config):
    random.seed(0)
    torch.manual_seed(0)
    imgs = _pil(_synthetic_batch(32, 32))
    weak, strong = A.weak_transform(32), A.strong_transform(32, config)
    pickle.loads(pickle.dumps(strong))  # DataLoader workers may be spawned
    for img in imgs + [imgs[0].convert("L"), imgs[1].resize((40, 28))]:
        for t in (weak, strong):
            out = t(img)
            assert isinstance(out, Image.Image) and out.size == (32, 32) and out.mode == img.mode


def test_cpu_inc1_high_magnitude_does_not_crash():
    """timm + Pillow 13 raise on posterize(bits=0); the CPU path keeps the old result."""
    random.seed(0)
    strong = A.strong_transform(32, "rand-m10-inc1-n4-p1.0", pad=0, hflip=False)
    img = _pil(_synthetic_batch(2, 32))[0]
    for _ in range(30):
        strong(img)


def test_weak_transform_identity_and_distribution():
    img = _pil(_synthetic_batch(2, 32))[0]
    identity = A.weak_transform(32, hflip=False, pad=0)
    assert np.array_equal(np.asarray(identity(img)), np.asarray(img))
    torch.manual_seed(0)
    t = A.weak_transform(32, pad=0)
    flipped = [np.array_equal(np.asarray(t(img)), np.asarray(img)[:, ::-1]) for _ in range(400)]
    assert 0.4 < np.mean(flipped) < 0.6


def test_paper_cpu_path_cutout():
    random.seed(0)
    ra = A.PaperRandAugment(num_layers=0, fill=(255, 0, 255))  # Cutout alone
    img = Image.new("RGB", (32, 32), (10, 20, 30))
    for _ in range(100):
        mask = (np.asarray(ra(img)) == (255, 0, 255)).all(-1)
        ys, xs = np.nonzero(mask)
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert mask.sum() == h * w and h <= 16 and w <= 16  # one clipped 16px square
        assert h == 16 or ys.min() == 0 or ys.max() == 31
        assert w == 16 or xs.min() == 0 or xs.max() == 31


@pytest.mark.parametrize("compiled_c", [True, False], ids=["augment_native.c", "tensor ops"])
@pytest.mark.parametrize("config", ["rand-m9-mstd0.5", "rand-m7-n3-mstd1-inc1", "paper"])
def test_grouped_cpu_application_equals_the_static_shape_one(config, compiled_c, monkeypatch):
    """Eager CPU applies each op to its own samples only (in C where a compiler is at hand, else
    as tensor ops); compiled / accelerator code computes every op for every sample and selects.
    All must give the very same pixels."""
    if not compiled_c:
        monkeypatch.setattr(native, "library", lambda: None)
    elif native.library() is None:
        pytest.skip("no C compiler here")
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (96, 3, 16, 16), dtype=torch.uint8, generator=g)
    params = A.sample_rand_augment_params(96, config, generator=g, image_size=(16, 16))
    assert T._grouped(x)
    grouped = A.apply_rand_augment(x, params, config)
    monkeypatch.setattr(T, "_grouped", lambda images: False)
    assert torch.equal(grouped, A.apply_rand_augment(x, params, config))
    assert not torch.equal(grouped, x)
