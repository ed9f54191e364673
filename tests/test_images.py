"""Image utilities: uint8 conversion, PNG round trips, grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dtrak.data import DataError
from dtrak.images import load_pngs, make_grid, save_grid, save_png, save_pngs, to_uint8


def _levels(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random images whose values are exact 8-bit levels u / 127.5 - 1."""
    u = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))
    return u.float() / 127.5 - 1


def test_to_uint8_range_and_shapes():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 2, 2)
    assert to_uint8(x).tolist() == [[[0, 128], [255, 255]]]
    assert to_uint8(np.zeros((2, 3, 4, 5))).shape == (2, 4, 5, 3)
    assert to_uint8(torch.zeros(3, 4, 5)).shape == (4, 5, 3)
    with pytest.raises(ValueError, match="expected images"):
        to_uint8(torch.zeros(2, 2, 4, 4))


@pytest.mark.parametrize("channels", [1, 3])
def test_png_round_trip_is_exact(tmp_path, channels):
    x = _levels((5, channels, 6, 6))
    paths = save_pngs(x, tmp_path / "out", prefix="gen_", start=10)
    assert [p.name for p in paths][:2] == ["gen_000010.png", "gen_000011.png"]
    back = load_pngs(paths)
    assert back.shape == x.shape and torch.allclose(back, x, atol=1e-6)
    single = save_png(x[0], tmp_path / "one" / "x.png")
    assert torch.allclose(load_pngs([single])[0], x[0], atol=1e-6)


def test_load_pngs_errors(tmp_path):
    with pytest.raises(DataError, match="no paths"):
        load_pngs([])
    p = save_png(_levels((3, 4, 4)), tmp_path / "a.png")
    q = save_png(_levels((3, 6, 6)), tmp_path / "b.png")
    with pytest.raises(DataError, match=r"b.png is 6x6 but"):
        load_pngs([p, q])


def test_make_grid_shapes_and_padding():
    x = _levels((5, 3, 8, 8))
    g = make_grid(x)
    assert g.dtype == np.uint8 and g.shape == (2 * 10 + 2, 3 * 10 + 2, 3)
    assert (g[0] == 255).all() and (g[-1] == 255).all()  # white padding
    assert np.array_equal(g[2:10, 2:10], to_uint8(x[:1])[0])
    g = make_grid(x, nrow=5, padding=0, upscale=2, pad_value=-1.0)
    assert g.shape == (16, 80, 3)
    grey = make_grid(_levels((3, 1, 4, 4)), nrow=1, padding=1)
    assert grey.shape == (3 * 5 + 1, 6, 3) and (grey[..., 0] == grey[..., 2]).all()


def test_save_grid_upscales_small_tiles(tmp_path):
    path = save_grid(_levels((4, 1, 8, 8)), tmp_path / "g" / "grid.png", nrow=2)
    with Image.open(path) as im:
        assert im.size == (2 * 66 + 2, 2 * 66 + 2)
    path = save_grid(_levels((2, 3, 32, 32)), tmp_path / "g2.png", upscale=1)
    with Image.open(path) as im:
        assert im.size == (2 * 34 + 2, 36)
