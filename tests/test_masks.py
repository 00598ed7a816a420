"""Tests for keyface_core.masks: latent masks, feathering, bit-exact compositing, square crops."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keyface_core.errors import InputMismatchError
from keyface_core.masks import composite, crop_square, feather, latent_mask, paste_square, square_crop_box


def _disk(h, w, cy, cx, r):
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return (((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r).float()


# --- latent_mask -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mask_shape, latent_hw, batch",
    [((768, 1024), (96, 128), 1), ((2, 768, 1024), (96, 128), 2), ((3, 1, 768, 1024), (48, 64), 3)],
)
def test_latent_mask_shapes_and_values(mask_shape, latent_hw, batch):
    m = torch.rand(mask_shape)
    out = latent_mask(m, latent_hw)
    assert out.shape == (batch, 1, *latent_hw) and out.dtype == torch.float32
    assert set(out.unique().tolist()) <= {0.0, 1.0}


def test_latent_mask_area_downsample_and_threshold():
    m = torch.zeros(64, 64)
    m[:8, :8] = 1.0  # one full cell
    m[8:16, :4] = 1.0  # half of the next cell down
    assert latent_mask(m, (8, 8))[0, 0, 0, 0] == 1
    assert latent_mask(m, (8, 8), threshold=0.5)[0, 0, 1, 0] == 1
    assert latent_mask(m, (8, 8), threshold=0.6)[0, 0, 1, 0] == 0
    assert latent_mask(m, (8, 8)).sum() == 2


def test_latent_mask_accepts_sizes_rounded_down_to_the_factor():
    # 1030x770 pixels encode to 128x96 cells at factor 8 (the encoder centre-crops the remainder).
    m = torch.ones(770, 1030)
    assert latent_mask(m, (96, 128)).shape == (1, 1, 96, 128)
    assert latent_mask(torch.ones(770, 1030), (48, 64)).shape == (1, 1, 48, 64)  # factor 16


def test_latent_mask_rejects_other_aspect_ratio():
    with pytest.raises(InputMismatchError, match=r"1024x1024.*128x96"):
        latent_mask(torch.ones(1024, 1024), (96, 128))
    with pytest.raises(InputMismatchError):
        latent_mask(torch.ones(32, 32), (64, 64))  # smaller than the grid
    with pytest.raises(InputMismatchError, match="MASK"):
        latent_mask(torch.ones(1, 64, 64, 3), (8, 8))  # an IMAGE, not a MASK


def test_latent_mask_at_latent_size_only_binarizes():
    m = torch.tensor([[0.2, 0.5], [0.7, 0.49]])
    assert torch.equal(latent_mask(m, (2, 2))[0, 0], torch.tensor([[0.0, 1.0], [1.0, 0.0]]))


def test_latent_mask_dilate_grows_by_cells():
    m = torch.zeros(128, 128)
    m[64:72, 64:72] = 1.0  # exactly latent cell (8, 8)
    out = latent_mask(m, (16, 16), dilate=2)[0, 0]
    assert out.sum() == 25 and torch.all(out[6:11, 6:11] == 1)


# --- feather -----------------------------------------------------------------------------------


def test_feather_zero_radius_is_identity():
    m = _disk(32, 32, 16, 16, 8)
    assert feather(m, 0) is m


@pytest.mark.parametrize("radius", [1, 4, 9, 16])
def test_feather_covers_hard_mask_and_falls_off_monotonically(radius):
    hard = _disk(128, 128, 64, 64, 20)
    soft = feather(hard, radius)
    assert soft.shape == hard.shape and soft.min() >= 0 and soft.max() <= 1
    assert torch.all(soft[hard == 1] == 1)  # covers the hard mask
    assert soft.sum() > hard.sum()  # and actually softens outward
    row = soft[64, 64:]  # centre outward, across the edge at x = 84
    assert torch.all(row[1:] <= row[:-1])
    assert torch.all(row[84 - 64 + radius + 1 :] == 0)  # gone radius_px outside the edge at x = 84


def test_feather_keeps_batch_shape():
    m = torch.stack([_disk(40, 50, 20, 25, 9), torch.zeros(40, 50)])
    soft = feather(m, 5)
    assert soft.shape == (2, 40, 50) and torch.all(soft[1] == 0)


# --- composite ---------------------------------------------------------------------------------


def test_composite_is_bit_identical_where_mask_is_zero():
    g = torch.Generator().manual_seed(0)
    bg, fg = torch.rand(2, 48, 64, 3, generator=g), torch.rand(2, 48, 64, 3, generator=g)
    mask = feather(_disk(48, 64, 24, 32, 10), 6).expand(2, 48, 64)
    out = composite(bg, fg, mask)
    zero = (mask == 0)[..., None].expand_as(bg)
    assert torch.equal(out[zero], bg[zero])
    one = (mask == 1)[..., None].expand_as(bg)
    assert torch.equal(out[one], fg[one])
    mid = ((mask > 0) & (mask < 1))[..., None].expand_as(bg)
    m = mask[..., None].expand_as(bg)
    assert torch.allclose(out[mid], (m * fg + (1 - m) * bg)[mid])


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_composite_untouched_pixels_keep_their_bits(seed):
    g = torch.Generator().manual_seed(seed)
    bg, fg = torch.rand(9, 7, 3, generator=g), torch.rand(9, 7, 3, generator=g)
    mask = torch.rand(9, 7, generator=g) * (torch.rand(9, 7, generator=g) > 0.5)
    out = composite(bg, fg, mask)
    zero = (mask == 0)[..., None].expand_as(bg)
    assert torch.equal(out[zero], bg[zero])


def test_composite_broadcasts_a_2d_mask_over_batch_and_channels():
    bg, fg = torch.zeros(3, 4, 5, 3), torch.ones(3, 4, 5, 3)
    mask = torch.zeros(4, 5)
    mask[1, 2] = 1
    out = composite(bg, fg, mask)
    assert out[:, 1, 2].eq(1).all() and out.sum() == 9


def test_composite_rejects_mismatched_shapes():
    with pytest.raises(InputMismatchError, match="shape"):
        composite(torch.zeros(1, 4, 4, 3), torch.zeros(1, 4, 5, 3), torch.zeros(4, 4))
    with pytest.raises(InputMismatchError, match="mask"):
        composite(torch.zeros(1, 4, 4, 3), torch.zeros(1, 4, 4, 3), torch.zeros(4, 5))
    with pytest.raises(InputMismatchError, match="mask"):
        composite(torch.zeros(2, 4, 4, 3), torch.zeros(2, 4, 4, 3), torch.zeros(3, 4, 4))


# --- square crops --------------------------------------------------------------------------------


def test_square_crop_box_centres_and_scales():
    assert square_crop_box((100, 100, 140, 160), (1000, 1000), context=2.0) == (60, 70, 120)


def test_square_crop_box_shifts_inside_without_shrinking():
    x, y, size = square_crop_box((0, 0, 50, 50), (500, 400), context=3.0)
    assert (x, y, size) == (0, 0, 150)
    x, y, size = square_crop_box((380, 480, 400, 500), (500, 400), context=4.0)
    assert size == 80 and x + size == 400 and y + size == 500


def test_square_crop_box_shrinks_only_for_small_images():
    x, y, size = square_crop_box((10, 10, 90, 50), (60, 100), context=2.0)
    assert (x, y, size) == (20, 0, 60)  # 60 high: shrunk to 60, still centred in x
    assert all(isinstance(v, int) for v in (x, y, size))
    with pytest.raises(InputMismatchError):
        square_crop_box((10, 10, 10, 20), (100, 100))


def test_crop_square_takes_the_box_and_resizes():
    img = torch.zeros(100, 120, 3)
    img[20:60, 30:70] = torch.tensor([0.2, 0.4, 0.6])
    crop = crop_square(img, (30, 20, 40), 64)
    assert crop.shape == (64, 64, 3)
    assert torch.allclose(crop, torch.tensor([0.2, 0.4, 0.6]).expand(64, 64, 3), atol=1e-5)
    with pytest.raises(InputMismatchError, match="does not fit"):
        crop_square(img, (100, 0, 40), 64)


def test_paste_square_changes_only_masked_pixels_inside_the_box():
    g = torch.Generator().manual_seed(1)
    img = torch.rand(90, 110, 3, generator=g)
    box = (20, 15, 60)
    crop = torch.rand(32, 32, 3, generator=g)
    crop_mask = feather(_disk(32, 32, 16, 16, 8), 3)
    out = paste_square(img, crop, box, crop_mask)
    assert out.shape == img.shape and not torch.equal(out, img)
    outside = torch.ones(90, 110, dtype=torch.bool)
    outside[15:75, 20:80] = False
    assert torch.equal(out[outside], img[outside])
    # Inside the box, pixels whose resized mask is 0 are untouched, so the border ring is too.
    assert torch.equal(out[15:75, 20:80][:2], img[15:75, 20:80][:2])
    changed = (out != img).any(-1)
    assert 0 < changed.sum() < 60 * 60 * 0.5 and changed[45, 50]  # the disk's centre changed


def test_paste_square_with_full_mask_round_trips_a_crop():
    img = torch.rand(64, 64, 3)
    box = (8, 8, 32)
    crop = crop_square(img, box, 32)
    out = paste_square(img, crop, box, torch.ones(32, 32))
    assert torch.equal(out, img)


def test_crop_and_paste_on_a_12_megapixel_image():
    img = torch.zeros(3000, 4000, 3)
    box = square_crop_box((1900, 1400, 2100, 1650), img.shape[:2])
    crop = crop_square(img, box, 512)
    assert crop.shape == (512, 512, 3)
    out = paste_square(img, torch.ones_like(crop), box, torch.ones(512, 512))
    x, y, size = box
    assert torch.allclose(out[y : y + size, x : x + size], torch.ones(1), atol=1e-5)
    assert out[:y].eq(0).all() and out[:, x + size :].eq(0).all()


def test_paste_square_rejects_mismatched_mask():
    with pytest.raises(InputMismatchError, match="face_mask_in_box"):
        paste_square(torch.zeros(40, 40, 3), torch.zeros(16, 16, 3), (0, 0, 20), torch.zeros(8, 8))
