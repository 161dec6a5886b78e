"""Progress of the offline loops (plain lines in logs, a tqdm bar on a terminal, silence when off), the training
tick line (ETA, sec/kimg, peak memory), and the saved sample grids (nearest-neighbour upscale, caption)."""

from __future__ import annotations

import io
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from hdebm_ray import progress as progress_mod
from hdebm_ray.evaluation.images import grid_image, save_grid
from hdebm_ray.progress import plain_line, progress
from hdebm_ray.training.stage_log import StageLogger


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv(progress_mod.ENV, raising=False)


class Tty(io.StringIO):
    def isatty(self):
        return True


# ---------------------------------------------------------------------------------------------------------------
# progress


def test_plain_mode_prints_periodic_lines_and_yields_items_unchanged(capsys):
    items = [object() for _ in range(100)]
    out = list(progress(items, desc="work", unit="batches", min_interval_s=0))
    assert len(out) == 100 and all(a is b for a, b in zip(out, items, strict=True))
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 10  # every 10%, the last one saying done
    assert all(line.startswith("[work] ") for line in lines)
    assert lines[3].startswith("[work] 40/100 batches (40%), ") and "s elapsed, ETA " in lines[3]
    assert lines[-1].startswith("[work] 100/100 batches (100%)") and lines[-1].endswith("done")


def test_plain_mode_lines_every_interval_without_total(capsys, monkeypatch):
    clock = iter(float(t) for t in range(0, 10_000, 20))  # 20 s per item
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: next(clock))
    assert list(progress((i for i in range(6)), desc="gen", unit="images", every_s=30)) == list(range(6))
    lines = capsys.readouterr().err.splitlines()
    # items at 20, 40, ... s: a line once 30 s have passed since the last one, then the final one
    assert lines == [
        "[gen] 2 images, 40.0 s elapsed",
        "[gen] 4 images, 0:01:20 elapsed",
        "[gen] 6 images, 0:02:00 elapsed",
        "[gen] 6 images, 0:02:20 elapsed, done",
    ]


def test_plain_mode_rate_limited(capsys):
    list(progress(range(1000), desc="fast", min_interval_s=60))
    assert len(capsys.readouterr().err.splitlines()) == 1  # only the final line


def test_silent_when_disabled(capsys, monkeypatch):
    assert list(progress(range(50), desc="off", enabled=False, min_interval_s=0)) == list(range(50))
    monkeypatch.setenv(progress_mod.ENV, "0")
    assert list(progress(range(50), desc="off", min_interval_s=0)) == list(range(50))
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_tqdm_on_a_terminal_and_rng_untouched(monkeypatch):
    tty = Tty()
    monkeypatch.setattr(progress_mod.sys, "stderr", tty)
    assert progress_mod.mode() == "tqdm"
    torch.manual_seed(0)
    state, np_state = torch.random.get_rng_state(), np.random.get_state()[1].copy()
    assert list(progress(range(20), desc="bar", unit="batches")) == list(range(20))
    assert "bar" in tty.getvalue() and "20/20" in tty.getvalue()
    assert torch.equal(torch.random.get_rng_state(), state) and np.array_equal(np.random.get_state()[1], np_state)
    monkeypatch.setenv(progress_mod.ENV, "plain")
    assert progress_mod.mode() == "plain"


def test_plain_line_format():
    assert plain_line("d", 40, 100, "batches", 12.3) == "[d] 40/100 batches (40%), 12.3 s elapsed, ETA 18.4 s"
    assert plain_line("d", 1, 100, "batches", 100) == "[d] 1/100 batches (1%), 0:01:40 elapsed, ETA 2:45:00"


def test_parquet_convert_shows_progress_and_writes_the_same(tmp_path, capsys):
    from hdebm_ray.data.convert import write_parquet_shards

    ds = TensorDataset(torch.rand(30, 1, 8, 8) * 2 - 1, torch.arange(30))
    quiet = write_parquet_shards(ds, str(tmp_path / "a"), 16)
    assert capsys.readouterr().err == ""
    shown = write_parquet_shards(ds, str(tmp_path / "b"), 16, progress=True)
    err = capsys.readouterr().err
    assert "[dataset convert] 30/30 images (100%)" in err and "\r" not in err
    assert [Path(p).read_bytes() for p in quiet] == [Path(p).read_bytes() for p in shown]


def test_folder_features_by_batch_equal_clean_fid(tmp_path, capsys):
    from hdebm_ray.evaluation.features import native_resize
    from hdebm_ray.evaluation.fid import folder_features, write_png_folder

    folder = write_png_folder(torch.rand(23, 3, 8, 8) * 2 - 1, tmp_path / "png")

    def fn(x):
        return x.flatten(1)[:, ::7] * torch.arange(1, x.shape[0] + 1)[:, None]  # depends on the batch layout

    from cleanfid.fid import get_folder_features

    whole = get_folder_features(
        str(folder),
        fn,
        num_workers=0,
        batch_size=5,
        device=torch.device("cpu"),
        mode="clean",
        custom_fn_resize=native_resize,
        verbose=False,
    )
    silent = folder_features(folder, fn, native_resize, 5, torch.device("cpu"))
    assert capsys.readouterr().err == ""
    np.testing.assert_array_equal(whole, silent)
    batched = folder_features(folder, fn, native_resize, 5, torch.device("cpu"), progress="feats")
    np.testing.assert_array_equal(whole, batched)
    assert "[feats] 5/5 batches (100%)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# the training tick line


def fake_stage():
    return SimpleNamespace(name="stage1", images_per_step=128, total_steps=1000)


def test_tick_line_has_eta_sec_per_kimg_and_peak_memory(capsys):
    logger = StageLogger(fake_stage(), None, enabled=True)
    metrics = {"Loss/total": 0.5, "Timing/sec_per_step": 0.15, "Timing/images_per_sec": 853.3}
    logger.log(200, metrics)
    line = capsys.readouterr().out.strip()
    assert line.startswith("[stage1] step 200/1000 kimg 25.6 total=0.5 sec/step 0.150")
    assert "sec/kimg 1.17" in line  # 0.15 s per 128 images
    assert "ETA 0:02:00" in line  # 800 steps left at 0.15 s
    assert re.search(r"peak mem host \d+\.\d\d GiB", line)
    if not torch.cuda.is_initialized():
        assert "gpu" not in line
    assert set(metrics) == {"Loss/total", "Timing/sec_per_step", "Timing/images_per_sec"}  # not mutated


def test_tick_line_without_timing_and_resource_scalars(capsys):
    logger = StageLogger(fake_stage(), None, enabled=True)
    scalars = {}
    logger.writer = SimpleNamespace(add_scalar=lambda k, v, n: scalars.__setitem__(k, (v, n)), flush=lambda: None)
    logger.log(1000, {})  # a stage with nothing to train
    line = capsys.readouterr().out.strip()
    assert line.startswith("[stage1] step 1000/1000 kimg 128.0 peak mem host")
    assert "ETA" not in line and "sec/kimg" not in line
    value, nimg = scalars["Resources/peak_host_mem_gib"]
    assert 0 < value < 1024 and nimg == 128_000


# ---------------------------------------------------------------------------------------------------------------
# saved grids


def native_grid(x: torch.Tensor) -> np.ndarray:
    """What torchvision's save_image writes for the native grid (the PNG of before)."""
    grid = grid_image(x)
    return grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()


def test_save_grid_is_a_nearest_neighbour_upscale(tmp_path):
    x = torch.rand(64, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    native = native_grid(x)
    assert native.shape == (137, 137, 3)
    img = np.asarray(Image.open(save_grid(x, tmp_path / "g.png")).convert("RGB"))
    factor = math.ceil(512 / 137)
    assert img.shape == (137 * factor, 137 * factor, 3) and img.shape[1] >= 512
    np.testing.assert_array_equal(img[:factor, :factor], np.broadcast_to(native[0, 0], (factor, factor, 3)))
    r, c = 40, 77  # one block inside an image
    block = img[r * factor : (r + 1) * factor, c * factor : (c + 1) * factor]
    np.testing.assert_array_equal(block, np.broadcast_to(native[r, c], block.shape))
    np.testing.assert_array_equal(img, native.repeat(factor, 0).repeat(factor, 1))
    assert grid_image(x).shape == (3, 137, 137)  # TensorBoard's grid stays native


def test_save_grid_with_caption(tmp_path):
    x = torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    caption = "distill step 8 (0.128 kimg), raw weights: dataset images noised to T'=200, then 1 DDIM step back"
    img = np.asarray(Image.open(save_grid(x, tmp_path / "c.png", caption=caption)).convert("RGB"))
    grid = native_grid(x).repeat(4, 0).repeat(4, 1)
    assert img.shape[1] == grid.shape[1] and img.shape[0] > grid.shape[0]
    strip = img[: img.shape[0] - grid.shape[0]]
    np.testing.assert_array_equal(img[strip.shape[0] :], grid)
    assert (strip == 255).all(-1).mean() > 0.8  # a white strip ...
    assert (strip < 128).all(-1).sum() > 100  # ... with dark text on it


def test_toy2d_scatter_saved_at_512_with_caption(tmp_path):
    img = Image.open(save_grid(torch.rand(200, 2) * 2 - 1, tmp_path / "t.png", caption="toy2d samples"))
    assert img.width == 512 and img.height > 512
