"""The generator zoo: each family trains offline in seconds, keeps the row's size, leaves its
architecture's upsampling in the network, reproduces by seed and caches its weights."""

import numpy as np
import pytest
import torch
from torch import nn

from aigd.dev import zoo
from conftest import small_zoo

UPSAMPLER = {"gan_tconv": nn.ConvTranspose2d, "ae_resize": nn.Upsample, "vae": nn.PixelShuffle, "ddpm": None}


def _patches(n=64, side=32):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, side, side, generator=g) * 2 - 1


@pytest.mark.parametrize("family", zoo.TRAINED)
def test_each_family_trains_and_generates_at_the_canvas_size(family):
    cfg = small_zoo()
    model = zoo.train(family, _patches(), cfg, seed=0)
    canvases = np.random.default_rng(0).integers(0, 256, (3, 100, 156, 3), dtype=np.uint8)  # 84x140 + margins
    out = zoo.generate(family, model, canvases, cfg, seed=1)
    assert out.shape == canvases.shape and out.dtype == np.uint8
    assert not np.array_equal(out, canvases)
    np.testing.assert_array_equal(out, zoo.generate(family, model, canvases, cfg, seed=1))  # reproducible
    if UPSAMPLER[family] is not None:
        assert any(isinstance(m, UPSAMPLER[family]) for m in model.modules())


def test_training_changes_the_weights_and_depends_on_the_seed():
    cfg = small_zoo()
    fresh = zoo.build("ae_resize", cfg.width).state_dict()
    a = zoo.train("ae_resize", _patches(), cfg, seed=0).state_dict()
    b = zoo.train("ae_resize", _patches(), cfg, seed=1).state_dict()
    assert any(not torch.equal(fresh[k], a[k]) for k in a)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_weights_are_cached_by_what_shapes_them(tmp_path):
    from dataclasses import replace

    cfg = replace(small_zoo(), cache_dir=str(tmp_path))
    calls = []

    def patches():
        calls.append(1)
        return _patches()

    first, cached = zoo.load_or_train("vae", patches, cfg, 0, ["astronaut", "coffee"])
    again, cached_again = zoo.load_or_train("vae", patches, cfg, 0, ["coffee", "astronaut"])
    assert (cached, cached_again, len(calls)) == (False, True, 1)
    for k, v in first.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])
    zoo.load_or_train("vae", patches, replace(cfg, steps=cfg.steps + 1), 0, ["astronaut", "coffee"])
    zoo.load_or_train("vae", patches, cfg, 0, ["astronaut"])
    assert len(calls) == 3 and len(list(tmp_path.glob("vae-*.pt"))) == 3


def test_resample_family_leaves_a_two_pixel_period():
    a = np.random.default_rng(0).integers(0, 256, (112, 140, 3), dtype=np.uint8)
    up = zoo.resample(a, "nearest").astype(int)
    np.testing.assert_array_equal(up[0::2], up[1::2])
    assert zoo.resample(a, "tconv").shape == a.shape
