"""plots.save_grid: the PNG grid of samples."""
import warnings

import numpy as np
import pytest
import torch

from ucgm_fast.plots import save_grid


def test_save_grid_warns_about_non_finite_samples(tmp_path):
    from PIL import Image

    images = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    images[2, 0, 3, 3] = float("nan")  # a diverged sample: silently, only a black pixel or tile
    images[4] = float("inf")
    message = r"save_grid: 2 of 6 images hold NaN or infinite values \(first: \[2, 4\]\)"
    with pytest.warns(RuntimeWarning, match=message):
        save_grid(images, str(tmp_path / "g.png"), nrow=3, scale=1, pad=0)
    arr = np.asarray(Image.open(tmp_path / "g.png"))
    assert arr.shape == (16, 24)
    assert arr[3, 2 * 8 + 3] == 0 and (arr[8:, 8:16] == 255).all()  # NaN drawn black, +inf white
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # finite images: no warning
        save_grid(images.nan_to_num(0.5, 0.5, 0.5), str(tmp_path / "ok.png"))
