"""Transforms: recipes, determinism, random erasing, and paired image + mask alignment."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from dpm_ops.data import transforms as transforms_module
from dpm_ops.data.transforms import (
    MASKREID_MEAN,
    CenterCrop,
    ColorJitter,
    Compose,
    Normalize,
    Pad,
    RandomCrop,
    RandomErasing,
    RandomHorizontalFlip,
    Resize,
    ToTensor,
    build_transforms,
    dpm_train_transforms,
    masked_image,
)

RED, BLUE = (255, 0, 0), (0, 0, 255)


def person_with_mask(width=16, height=32):
    """A blue image with a red, deliberately asymmetric L-shaped 'person' and its mask."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[4:28, 3:7] = 255  # tall bar on the left
    mask[20:28, 7:12] = 255  # foot to the right
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[...] = BLUE
    image[mask > 0] = RED
    return Image.fromarray(image), Image.fromarray(mask, "L")


def generator(seed):
    return torch.Generator().manual_seed(seed)


def test_paired_dpm_train_keeps_image_and_mask_aligned():
    image, mask = person_with_mask()
    transform = dpm_train_transforms(size=(32, 16), padding=4, erasing=0.0)
    flipped = shifted = 0
    reference_image, reference_mask = transform.pair(image, mask, generator(0))
    for seed in range(40):
        out_image, out_mask = transform.pair(image, mask, generator(seed))
        assert out_image.shape == (3, 32, 16) and out_mask.shape == (1, 32, 16)
        assert set(out_mask.unique().tolist()) <= {0.0, 1.0}
        red = (out_image[0] > 0.9) & (out_image[2] < -0.9)  # normalised: red channel 1, blue -1
        assert torch.equal(red, out_mask[0].bool()), f"image and mask disagree for seed {seed}"
        left_heavy = out_mask[0, :, :8].sum() > out_mask[0, :, 8:].sum()
        flipped += not left_heavy
        shifted += not torch.equal(out_mask, reference_mask)
    assert 5 < flipped < 35 and shifted > 30  # the flip and the crop really vary


def test_paired_maskreid_resize_and_centre_crop_stay_aligned():
    image, mask = person_with_mask(32, 80)
    for train in (True, False):
        transform = build_transforms("maskreid", train=train)
        out_image, out_mask = transform.pair(image, mask, generator(7))
        assert out_image.shape == (3, 144, 56) and out_mask.shape == (1, 144, 56)
        # bilinear image vs nearest mask: agree everywhere except a 1-2 px boundary band
        red = out_image[0] > out_image[2]
        disagreement = (red != out_mask[0].bool()).float().mean().item()
        assert disagreement < 0.03
    train, test = build_transforms("maskreid", train=True), build_transforms("maskreid", train=False)
    assert [type(step).__name__ for step in test.transforms] == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert train.transforms[0].interpolation == test.transforms[0].interpolation == "bilinear"  # DGD's pipeline


def test_photometric_steps_leave_the_mask_alone():
    image, mask = person_with_mask()
    steps = Compose(
        [ColorJitter(0.3, 0.3, 0.2, 0.2), ToTensor(), Normalize((0.5,) * 3, (0.5,) * 3), RandomErasing(1.0)]
    )
    _, out_mask = steps.pair(image, mask, generator(1))
    assert torch.equal(out_mask, ToTensor().pair(image, mask)[1])


def test_same_generator_seed_same_output_and_seeds_differ():
    image, _ = person_with_mask()
    transform = dpm_train_transforms(size=(32, 16), padding=4, color_jitter=True)
    first = transform(image, generator(5))
    assert torch.equal(first, transform(image, generator(5)))
    assert any(not torch.equal(first, transform(image, generator(seed))) for seed in range(6, 10))


def test_dpm_recipes_shapes_and_normalisation():
    white = Image.new("RGB", (64, 128), (255, 255, 255))
    test = build_transforms("dpm", train=False)
    out = test(white)
    assert out.shape == (3, 256, 128) and torch.allclose(out, torch.ones_like(out))
    assert torch.allclose(test(Image.new("RGB", (64, 128))), -torch.ones(3, 256, 128))
    train = build_transforms("dpm", train=True)
    assert train(white, generator(0)).shape == (3, 256, 128)
    names = [type(step).__name__ for step in train.transforms]
    assert names == ["Resize", "RandomHorizontalFlip", "Pad", "RandomCrop", "ToTensor", "Normalize", "RandomErasing"]
    assert train.transforms[0].interpolation == "bicubic" and test.transforms[0].interpolation == "bilinear"
    pad, erase = train.transforms[2], train.transforms[-1]
    assert pad.padding == 10 and (erase.probability, erase.mode, erase.max_count) == (0.5, "pixel", 1)  # dpm.md §7
    jitter = build_transforms("dpm", train=True, color_jitter=True)
    assert [type(step).__name__ for step in jitter.transforms][:3] == ["Resize", "ColorJitter", "RandomHorizontalFlip"]
    colour = jitter.transforms[1]
    assert (colour.brightness, colour.contrast, colour.saturation, colour.hue) == (0.3, 0.3, 0.2, 0.2)
    with pytest.raises(ValueError, match="unknown transform recipe"):
        build_transforms("resnet", train=True)


def test_maskreid_mean_pixel_maps_to_zero_and_masked_background_is_zero():
    mean_pixel = tuple(int(round(c * 255)) for c in MASKREID_MEAN)
    out = build_transforms("maskreid", train=False)(Image.new("RGB", (64, 160), mean_pixel))
    assert out.abs().max().item() < 1e-3
    image, mask = person_with_mask(64, 160)
    normalised, mask_tensor = build_transforms("maskreid", train=False).pair(image, mask)
    composite = masked_image(normalised, mask_tensor)
    assert torch.all(composite[:, mask_tensor[0] == 0] == 0)
    assert torch.equal(composite[:, mask_tensor[0] == 1], normalised[:, mask_tensor[0] == 1])
    # on the 0-255 scale, as DGD: red (255) minus the mean 101
    assert normalised[0, mask_tensor[0] == 1].max().item() == pytest.approx(255 - 101, abs=1e-3)


def test_random_erasing_area_fill_and_probability():
    tensor = torch.full((3, 64, 32), 5.0)
    erase = RandomErasing(probability=1.0, mode="pixel")
    areas = []
    for seed in range(30):
        out = erase(tensor, generator(seed))
        changed = (out != 5.0).any(0)
        rows, cols = changed.any(1).nonzero(), changed.any(0).nonzero()
        box_h, box_w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert changed.sum() == box_h * box_w, "one solid rectangle"
        areas.append(box_h * box_w / (64 * 32))
        noise = out[:, changed]
        assert noise.std().item() > 0.5 and abs(noise.mean().item()) < 1.0  # N(0, 1) pixels
    assert 0.015 <= min(areas) and max(areas) <= 0.4
    assert torch.equal(RandomErasing(probability=0.0)(tensor, generator(0)), tensor)
    assert tensor.eq(5.0).all(), "input untouched"
    hits = sum(not torch.equal(RandomErasing(0.5)(tensor, generator(s)), tensor) for s in range(200))
    assert 70 < hits < 130
    # timm: a box must be strictly smaller than the image, so a whole-image box is never erased
    whole = RandomErasing(1.0, area=(1.0, 1.0), aspect=(1.0, 1.0))
    assert torch.equal(whole(torch.zeros(3, 8, 8), generator(0)), torch.zeros(3, 8, 8))


def test_random_erasing_noise_follows_the_pipelines_scale():
    """MaskReID's pipeline works in grey levels (std 1/255): timm's N(0, 1) noise erased to a flat grey patch."""
    tensor = torch.zeros((3, 64, 32))
    erase = RandomErasing(1.0, area=(0.3, 0.3), noise_std=(2.0, 2.0, 2.0))
    noise = erase(tensor, generator(0))
    assert 1.6 < noise[noise != 0].std().item() < 2.4
    maskreid = build_transforms("maskreid", train=True, erasing=1.0)
    (erasing,) = [step for step in maskreid.transforms if isinstance(step, RandomErasing)]
    assert erasing.noise_std == pytest.approx((127.5, 127.5, 127.5))  # DPM's N(0, 1) at std 0.5, in grey levels
    for bad in ((1.0, 1.0), (1.0, 0.0, 1.0), "1"):
        with pytest.raises(ValueError, match=r"^RandomErasing: noise_std must"):
            RandomErasing(noise_std=bad)
    with pytest.raises(
        ValueError, match=r"^RandomErasing: noise_std holds 3 values \(R, G, B\), the tensor \(1, 8, 8\)"
    ):
        erase(torch.zeros(1, 8, 8), generator(0))


def test_random_erasing_count_splits_the_area_and_rand_fills_per_channel():
    tensor = torch.full((3, 200, 200), 5.0)
    erase = RandomErasing(1.0, area=(0.03, 0.03), mode="rand", max_count=3)
    counts = set()
    for seed in range(30):
        out = erase(tensor, generator(seed))
        changed = (out != 5.0).all(0)
        assert changed.float().mean().item() <= 0.031  # count boxes of area 0.03 / count each
        colours = out[:, changed].unique(dim=1)  # one N(0, 1) value per channel and box
        assert len(colours[0].unique()) == len(colours[1].unique()) == colours.shape[1]
        assert (colours[0] != colours[1]).all()  # a value per channel, not one for all
        counts.add(colours.shape[1])
    assert counts == {1, 2, 3}


def test_color_jitter_changes_colour_only():
    image, _ = person_with_mask()
    jittered = ColorJitter(hue=0.5)(image, generator(3))
    assert jittered.size == image.size
    before, after = np.asarray(image), np.asarray(jittered)
    assert not np.array_equal(before, after)
    red_before = (before == RED).all(-1)
    assert len(np.unique(after[red_before].reshape(-1, 3), axis=0)) == 1  # one region, one colour


def test_mask_values_from_128_are_foreground():
    mask = Image.fromarray(np.array([[0, 100, 127, 128, 200, 255]], dtype=np.uint8), "L")
    _, out = ToTensor().pair(Image.new("RGB", (6, 1)), mask)
    assert out[0, 0].tolist() == [0, 0, 0, 1, 1, 1]  # datasets: values >= 128 are foreground


def test_color_jitter_ranges_wrap_and_order():
    grey = Image.new("RGB", (4, 4), (128, 128, 128))
    brightness = {np.asarray(ColorJitter(brightness=0.5)(grey, generator(s)))[0, 0, 0] for s in range(20)}
    assert min(brightness) < 128 < max(brightness)  # factors on both sides of 1
    red = Image.new("RGB", (4, 4), RED)
    hues = [np.asarray(ColorJitter(hue=0.2)(red, generator(s)).convert("HSV"))[0, 0, 0] for s in range(20)]
    assert any(0 < h <= 51 for h in hues) and any(h >= 205 for h in hues)  # shifts both ways, wrapping at 256
    assert np.asarray(ColorJitter._shift_hue(red, -0.1).convert("HSV"))[0, 0, 0] == 256 - 25


@pytest.mark.parametrize("shift", [0.1, -0.1, 0.0021, -0.0021, 0.13, -0.2, 0.5, -0.5])
def test_hue_shift_truncates_as_torchvision(shift):
    """torchvision's adjust_hue (PIL): h += np.array(shift * 255).astype(np.uint8), a cast that truncates
    toward zero and wraps (-25.5 -> 231); rounding instead moved half the draws one step further."""
    hues = np.arange(256, dtype=np.uint8).reshape(16, 16)
    hsv = np.stack([hues, np.full_like(hues, 200), np.full_like(hues, 180)], axis=-1)
    image = Image.fromarray(hsv, "HSV").convert("RGB")
    h, saturation, value = image.convert("HSV").split()
    step = int(np.trunc(shift * 255)) % 256  # the uint8 cast's result on the platforms torchvision runs on
    shifted = Image.fromarray(((np.asarray(h).astype(np.int64) + step) % 256).astype(np.uint8), "L")
    expected = Image.merge("HSV", (shifted, saturation, value)).convert("RGB")
    assert np.array_equal(np.asarray(ColorJitter._shift_hue(image, shift)), np.asarray(expected))


def test_color_jitter_applies_its_steps_in_random_order(monkeypatch):
    order = []

    def recorder(name):
        return lambda image: type("Enhancer", (), {"enhance": lambda self, f: order.append(name) or image})()

    fake = type("ImageEnhance", (), {n: staticmethod(recorder(n)) for n in ("Brightness", "Contrast", "Color")})
    monkeypatch.setattr(transforms_module, "ImageEnhance", fake)
    orders = set()
    for seed in range(20):
        order.clear()
        ColorJitter(0.3, 0.3, 0.3)(Image.new("RGB", (2, 2)), generator(seed))
        orders.add(tuple(order))
    assert len(orders) > 2


def test_geometry_primitives():
    image, mask = person_with_mask()
    flipped, flipped_mask = RandomHorizontalFlip(1.0).pair(image, mask)
    assert np.array_equal(np.asarray(flipped_mask), np.asarray(mask)[:, ::-1])
    padded, padded_mask = Pad(3).pair(image, mask)
    assert padded.size == (22, 38) and np.asarray(padded_mask)[:3].max() == 0
    assert Resize((8, 4), "nearest")(image).size == (4, 8)
    _, resized_mask = Resize((13, 7), "bicubic").pair(image, mask)
    assert set(np.unique(np.asarray(resized_mask)).tolist()) == {0, 255}  # nearest: no blended mask values
    columns = Image.fromarray(np.tile(np.arange(20, dtype=np.uint8), (30, 1)))  # 20x30, pixel value = x
    rows = Image.fromarray(np.tile(np.arange(30, dtype=np.uint8)[:, None], (1, 20)))  # 20x30, pixel value = y
    lefts = {np.asarray(RandomCrop((30, 16))(columns, generator(s)))[0, 0] for s in range(60)}
    tops = {np.asarray(RandomCrop((26, 20))(rows, generator(s)))[0, 0] for s in range(60)}
    assert lefts == tops == {0, 1, 2, 3, 4}  # every window position, both ends included
    assert np.asarray(CenterCrop((25, 15))(columns))[0, 0] == 2  # floor((20 - 15) / 2)
    assert np.asarray(CenterCrop((25, 15))(rows))[0, 0] == 2  # floor((30 - 25) / 2)
    with pytest.raises(
        ValueError, match=r"^RandomCrop: cannot crop \(height, width\) = \(10, 20\) from a 32 x 16 image$"
    ):
        RandomCrop((10, 20))(image)
    with pytest.raises(
        ValueError, match=r"^CenterCrop: cannot crop \(height, width\) = \(31, 20\) from a 30 x 20 image$"
    ):
        CenterCrop((31, 20))(rows)
    with pytest.raises(ValueError, match="interpolation"):
        Resize((8, 4), "lanczos5")


def test_maskreid_test_pipeline_is_dgds_resize_centre_crop_and_mean_subtraction():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (100, 40, 3), dtype=np.uint8))
    out = build_transforms("maskreid", train=False)(image)
    # DGD: resize to 160x64 (bilinear), centre 144x56, BGR mean pixel (102, 102, 101) subtracted on 0-255
    resized = np.asarray(image.resize((64, 160), Image.Resampling.BILINEAR), dtype=np.float64)
    expected = resized[8:152, 4:60] - np.array([101.0, 102.0, 102.0])
    assert torch.allclose(out.double(), torch.from_numpy(expected).permute(2, 0, 1), atol=1e-3)


def test_color_jitter_draws_each_factor_from_one_minus_to_one_plus():
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8))
    enhancers = {
        "brightness": ImageEnhance.Brightness,
        "contrast": ImageEnhance.Contrast,
        "saturation": ImageEnhance.Color,
    }
    for name, enhancer in enhancers.items():
        for strength in (0.3, 1.5):  # 1.5: the lower end is clipped at 0
            for seed in range(3):
                u = torch.rand((), generator=generator(seed)).item()
                low = max(0.0, 1 - strength)
                expected = enhancer(image).enhance(low + (1 + strength - low) * u)
                out = ColorJitter(**{name: strength})(image, generator(seed))
                assert np.array_equal(np.asarray(out), np.asarray(expected)), (name, strength, seed)
    u = torch.rand((), generator=generator(4)).item()
    shifted = ColorJitter(hue=0.3)(image, generator(4))
    assert np.array_equal(np.asarray(shifted), np.asarray(ColorJitter._shift_hue(image, -0.3 + 0.6 * u)))
    assert ColorJitter(hue=0.5).hue == 0.5
    for hue in (0.51, -0.1):
        with pytest.raises(
            ValueError, match=rf"^ColorJitter: hue must be a finite number in \[0, 0.5\] .*, got {hue}$"
        ):
            ColorJitter(hue=hue)


def test_pad_fills_the_image_border_with_black_by_default():
    image, _ = person_with_mask()
    padded = np.asarray(Pad(2)(image))
    assert padded[:2].max() == padded[-2:].max() == padded[:, :2].max() == padded[:, -2:].max() == 0
    assert np.array_equal(padded[2:-2, 2:-2], np.asarray(image))
    assert np.asarray(Pad(2, fill=7)(image))[0, 0].tolist() == [7, 7, 7]  # every channel, as torchvision
    assert np.asarray(Pad(2, fill=(1, 2, 3))(image))[-1, -1].tolist() == [1, 2, 3]


def test_random_erasing_defaults_and_a_box_as_wide_or_as_tall_as_the_image():
    erase = RandomErasing()
    assert (erase.probability, erase.area, erase.aspect, erase.mode) == (0.5, (0.02, 1 / 3), (0.3, 1 / 0.3), "pixel")
    assert (erase.max_count, erase.attempts) == (1, 10)  # timm 0.4.9's defaults

    # timm accepts a box only when it is strictly narrower and strictly lower than the image
    def erased(height, width, area, aspect):
        ones = torch.ones(3, height, width)
        return not torch.equal(RandomErasing(1.0, area=(area, area), aspect=(aspect, aspect))(ones, generator(0)), ones)

    assert not erased(16, 4, 0.5, 2.0)  # area 32, aspect 2: a box 8 high and 4 wide, as wide as the image
    assert not erased(4, 16, 0.5, 0.5)  # a box 4 high and 8 wide, as tall as the image
    assert erased(32, 16, 0.25, 2.0)  # a box 16 high and 8 wide fits


def test_random_erasing_places_a_box_anywhere_edges_included_and_the_recipes_flip_half():
    erase = RandomErasing(1.0, area=(0.25, 0.25), aspect=(1.0, 1.0), mode="const")  # a 4x4 box in 8x8
    corners = set()
    for seed in range(80):
        erased = erase(torch.ones(1, 8, 8), generator(seed))[0] == 0
        rows, cols = erased.any(1).nonzero(), erased.any(0).nonzero()
        corners.add((int(rows.min()), int(cols.min())))
    assert corners == {(top, left) for top in range(5) for left in range(5)}  # timm: randint(0, H - h) inclusive
    for recipe in ("dpm", "maskreid"):
        flips = [
            step for step in build_transforms(recipe, train=True).transforms if isinstance(step, RandomHorizontalFlip)
        ]
        assert [flip.p for flip in flips] == [0.5]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Resize((0, 128)), r"Resize: size must be 2 integers in \[1, 4096\] \(height, width\), got \(0, 128\)"),
        (
            lambda: Resize((60000, 128)),
            r"Resize: size must be 2 integers in \[1, 4096\]",
        ),  # a MemoryError at the first image
        (
            lambda: Pad(4, fill=300),
            r"Pad: fill must be an integer in \[0, 255\] \(an 8-bit value for every channel\), got 300",
        ),
        (lambda: Pad(4, fill=(1, 2)), r"Pad: fill must be 3 integers in \[0, 255\] \(8-bit RGB, or one int for all\)"),
        (lambda: Pad(4, fill="red"), r"Pad: fill must be 3 integers in \[0, 255\]"),
        (lambda: Resize(256), "Resize: size must be .*, got 256"),
        (lambda: RandomCrop((256.5, 128)), r"RandomCrop: size must be .*, got \(256.5, 128\)"),
        (lambda: CenterCrop((256,)), r"CenterCrop: size must be .*, got \(256,\)"),
        (lambda: Pad(-1), r"Pad: padding must be an integer in \[0, 4096\], got -1"),
        (lambda: RandomHorizontalFlip(1.5), r"RandomHorizontalFlip: p must be a finite number in \[0, 1\], got 1.5"),
        (lambda: ColorJitter(brightness=-0.2), "ColorJitter: brightness must be a finite number >= 0, got -0.2"),
        (lambda: Normalize((0.5, 0.5), (0.5, 0.5, 0.5)), r"Normalize: mean and std must hold 3 values \(R, G, B\)"),
        (lambda: Normalize((0.5,) * 3, (0.5, 0.0, 0.5)), "Normalize: std must be a finite number > 0, got 0.0"),
        (
            lambda: RandomErasing(probability=2),
            r"RandomErasing: probability must be a finite number in \[0, 1\], got 2",
        ),
        (
            lambda: RandomErasing(area=(0.3, 0.1)),
            r"RandomErasing: area\[1\] must be a finite number >= 0.3 \(area\[0\]\)",
        ),
        (lambda: RandomErasing(area=(0.1, 2.0)), r"RandomErasing: area must be a range of shares of the image"),
        (lambda: RandomErasing(aspect=(0.0, 3.0)), r"RandomErasing: aspect\[0\] must be a finite number > 0, got 0.0"),
        (lambda: RandomErasing(max_count=0), "RandomErasing: max_count must be an integer >= 1, got 0"),
        (lambda: RandomErasing(mode="zero"), "RandomErasing: mode must be 'pixel', 'rand' or 'const', got 'zero'$"),
        (lambda: RandomErasing(area=0.3), r"RandomErasing: area must be a \(low, high\) pair, got 0.3$"),
    ],
)
def test_transform_settings_out_of_range_are_named_when_built(make, message):
    # each of these used to be taken, to fail at the first image (a crop of 0 pixels, a negative border
    # from PIL, a division by a zero std) or to train on nonsense (a flip with p 1.5 always flips)
    with pytest.raises(ValueError, match=f"^{message}"):
        make()


def test_a_recipe_takes_a_pil_image():
    transform = build_transforms("dpm", train=False, size=(32, 16))
    with pytest.raises(ValueError, match=r"^image must be a PIL.Image \(e.g. image_io.read_image's\), got ndarray$"):
        transform(np.zeros((32, 16, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "recipe, train, options, needle",
    [
        # a negative or NaN probability dropped the erasing step without a word
        ("dpm", True, dict(erasing=-1.0), "dpm_train_transforms: erasing must be a finite number in [0, 1]"),
        ("dpm", True, dict(erasing=float("nan")), "erasing must be a finite number in [0, 1] (a probability), got nan"),
        ("maskreid", True, dict(erasing=2.0), "maskreid_train_transforms: erasing must be a finite number in [0, 1]"),
        ("dpm", True, dict(color_jitter="no"), "dpm_train_transforms: color_jitter must be True or False, got 'no'"),
        ("dpm", "no", {}, "build_transforms: train must be True or False, got 'no'"),  # was the random pipeline
        (["dpm"], True, {}, "unknown transform recipe ['dpm']"),  # was a TypeError (unhashable)
        (
            "dpm",
            True,
            dict(sizee=(8, 8)),
            "build_transforms: dpm_train_transforms takes no option 'sizee'; its options: size",
        ),
        # a crop larger than the resize failed at the first image, in the data loader
        (
            "maskreid",
            False,
            dict(resize=(10, 10)),
            "maskreid_test_transforms: crop (144, 56) must fit in resize (10, 10)",
        ),
        (
            "maskreid",
            True,
            dict(crop=(170, 56)),
            "maskreid_train_transforms: crop (170, 56) must fit in resize (160, 64)",
        ),
    ],
)
def test_build_transforms_refuses_bad_options_when_built(recipe, train, options, needle):
    with pytest.raises(ValueError) as error:
        build_transforms(recipe, train, **options)
    assert needle in str(error.value)


def test_transforms_and_decoded_images_take_what_the_files_give():
    """A 16-bit image given to a transform (or DecodedImages) went white, where read_image scales it; a mask of
    another size was stretched to its image; DecodedImages took two images for one record."""
    from dpm_ops.data import DecodedImages, ImageRecord
    from dpm_ops.data.transforms import build_transforms

    grey = np.full((16, 8), 40000, dtype=np.uint16)
    sixteen = Image.frombytes("I;16", (8, 16), grey.tobytes())
    transform = build_transforms("dpm", False)
    expected = transform(Image.fromarray(np.full((16, 8, 3), (40000 + 128) // 257, dtype=np.uint8)))
    torch.testing.assert_close(transform(sixteen), expected)
    with pytest.raises(ValueError, match=r"mask given to pair\(\) is 8x64 but its image is 8x16"):
        transform.pair(Image.new("RGB", (8, 16)), Image.new("L", (8, 64)))
    records = [ImageRecord("a.png", 1, 0)]
    with pytest.raises(ValueError, match=r"DecodedImages: images must be one per record \(1\), got 2"):
        DecodedImages(records, [sixteen, sixteen], transform)
    with pytest.raises(ValueError, match="mask masks\\[0\\] is 8x64 but its image is 8x16"):
        DecodedImages(records, [sixteen], transform, masks=[Image.new("L", (8, 64))])
    torch.testing.assert_close(DecodedImages(records, [sixteen], transform)[0]["image"], expected)
