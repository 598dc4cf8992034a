"""Pictures for people: the checkerboard, the display window and the registration check sheet."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from fusion.preview import checkerboard, display_range, registration_sheet
from fusion.registration.quality import check_sheet


def test_checkerboard_alternates_whole_tiles():
    a, b = np.zeros((40, 60)), np.ones((40, 60))
    board = checkerboard(a, b, tiles=4)  # tiles of 10 x 15 pixels
    assert board[0, 0] == 0 and board[0, 15] == 1 and board[10, 0] == 1 and board[10, 15] == 0
    assert board[:10, :15].std() == 0 and board.mean() == 0.5


def test_display_range_ignores_padding_and_clips():
    vol = np.full((4, 8, 8), -3024.0)  # CT padding
    vol[:, 2:6, 2:6] = np.linspace(0, 100, 64).reshape(4, 4, 4)
    out = display_range(vol, 0, 100)
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    assert np.all(out[:, 0, 0] == 0.0)  # padding below the window


def test_registration_sheet_has_physical_proportions():
    vol = np.random.default_rng(0).random((20, 64, 64))
    sheet = registration_sheet(vol, vol, vol, (5.0, 1.0, 1.0), ("CT", "MR"), "title")
    # three rows (axial 64 px high, coronal/sagittal 20 slices x 5 mm = 100 px high: the tallest cell)
    assert sheet.width == 5 * (64 + 4) + 4
    assert sheet.height == 18 + 3 * (100 + 14 + 4) + 4


def test_check_sheet_shows_the_moved_overlay():
    """An overlay shifted by 12 mm: 'after' with the true transform matches the base, 'before' does not."""
    arr = np.zeros((30, 60, 60), np.float32)
    arr[8:22, 15:45, 20:40] = 1.0
    base = sitk.GetImageFromArray(arr)
    base.SetSpacing((2.0, 2.0, 3.0))
    moving = sitk.Image(base)
    moving.SetOrigin((12.0, 0.0, 0.0))  # the same object 12 mm to patient left
    shift = sitk.TranslationTransform(3, (12.0, 0.0, 0.0))
    sheet = np.asarray(check_sheet(base, moving, shift, ("CT", "MR")))
    cell = 60 + 4  # axial cells are 60 x 60 here, 4 px padding, 14 px label
    axial = lambda col: sheet[4 + 14:4 + 14 + 60, 4 + col * cell:4 + col * cell + 60, 0].astype(float)
    assert np.abs(axial(3) - axial(0)).mean() < 1.0  # registered = base
    assert np.abs(axial(1) - axial(0)).mean() > 20.0  # as acquired: 6 columns off
