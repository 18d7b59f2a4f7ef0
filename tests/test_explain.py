"""Explanations on the tiny model, in this process: the token layout the maps assume, Captum's
attributions checked against the model itself, the answer beside the map, deadlines and versions,
and the faithfulness / localization measures on inputs with a known answer."""

from __future__ import annotations

import base64
import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from aigd import config as C
from aigd.batching import model_batch, normalize_pixels
from aigd.errors import AdapterUnavailable, DeadlineExceeded
from aigd.explain import Budget, Margin, attribute, explain, normalized, overlay_png, region_boxes, region_ids, token_shape
from aigd.explain_eval import deletion, filled, localization, mask_view
from conftest import SERVE_POLICY, make_adapter
from helpers import image_bytes, photo


@pytest.fixture(scope="module")
def scorer(tiny_model, adapters):
    from aigd.scorer import Scorer

    torch.manual_seed(0)
    return Scorer(C.ScoringConfig(model=C.ModelConfig(name_or_path=str(tiny_model), load_in_4bit=False),
                                  image=C.ImagePolicy(**SERVE_POLICY),
                                  adapters={k: str(adapters[k]) for k in ("method1", "method2")},
                                  ensemble=C.EnsembleConfig(weights={"method1": 3.0, "method2": 1.0})))


@pytest.fixture(scope="module")
def image(scorer):
    return scorer.prepare(image_bytes(photo(5, size=(150, 120))), C.DecodeLimits())


def _margin(scorer, image: np.ndarray, adapter: str) -> float:
    """Fake-minus-Real logit margin of an image, through the scoring path."""
    z = scorer.pair_logits([image], adapter)[0]
    return float(z[1] - z[0])


def _baseline(image: np.ndarray, cfg: C.ExplainConfig) -> np.ndarray:
    """The baseline image, made here with PIL and numpy, not by aigd.explain."""
    if cfg.baseline == "mean":
        return np.broadcast_to(image.reshape(-1, 3).mean(0).round().astype(np.uint8), image.shape)
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(cfg.blur_sigma)))


def test_each_token_is_four_consecutive_patches_in_row_major_order(scorer, image):
    """The map's layout: changing one 28-px cell of the image changes exactly its token's 4 patch rows."""
    h, w = token_shape(image)
    base = model_batch(scorer.processor, [image], scorer.policy)["pixel_values"].numpy()
    for r, c in [(0, 0), (1, 2), (h - 1, w - 1)]:
        edited = image.copy()
        edited[r * 28:(r + 1) * 28, c * 28:(c + 1) * 28] = 255 - edited[r * 28:(r + 1) * 28, c * 28:(c + 1) * 28]
        got = model_batch(scorer.processor, [edited], scorer.policy)["pixel_values"].numpy()
        changed = np.flatnonzero((got != base).any(axis=1))
        token = r * w + c
        assert changed.tolist() == list(range(4 * token, 4 * token + 4))


@pytest.mark.parametrize("baseline", ["blur", "mean"])
def test_occlusion_is_the_margin_lost_when_a_region_becomes_the_baseline(scorer, image, baseline):
    cfg = C.ExplainConfig(occlusion_regions=3, chunk=3, baseline=baseline)
    a = attribute(scorer, image, "method1", "occlusion", cfg)
    regions = region_ids(a.scores.shape, cfg.occlusion_regions)
    assert regions.max() + 1 <= 9
    base, full = _baseline(image, cfg), _margin(scorer, image, "method1")
    for region in np.unique(regions)[:4]:
        pixels = np.kron(regions == region, np.ones((28, 28), bool))
        edited = image.copy()
        edited[pixels] = base[pixels]
        assert a.scores[regions == region] == pytest.approx(full - _margin(scorer, edited, "method1"), abs=1e-4)
    assert np.unique(a.scores[regions == 0]).size == 1  # one value per region


def test_input_x_gradient_equals_autograd_and_integrated_gradients_batches_its_path_exactly(scorer, image):
    def patches(img):
        batch = model_batch(scorer.processor, [img], scorer.policy)
        return batch, normalize_pixels(batch["pixel_values"], batch["pixel_affine"])[None]

    batch, x = patches(image)
    x.requires_grad_()
    margin = Margin(scorer, scorer.member("method2"), batch, torch.zeros(1))(x)[0]
    (grad,) = torch.autograd.grad(margin, x)
    deviation = x.detach() - patches(_baseline(image, C.ExplainConfig()))[1]
    expected = (grad * deviation)[0].sum(-1).reshape(-1, 4).sum(1).numpy().reshape(token_shape(image))
    got = attribute(scorer, image, "method2", "input_x_gradient", C.ExplainConfig())
    np.testing.assert_allclose(got.scores, expected, rtol=1e-4, atol=1e-6)
    # integrated gradients: the path's copies batched `chunk` at a time give what one at a time gives
    one, eight = (attribute(scorer, image, "method2", "integrated_gradients", C.ExplainConfig(ig_steps=8, chunk=k))
                  for k in (1, 8))
    np.testing.assert_allclose(one.scores, eight.scores, rtol=1e-3, atol=1e-5)
    assert np.abs(one.scores).max() > 0


def test_the_answer_beside_the_map_is_the_scoring_answer(scorer, image):
    ens, members = scorer.cfg.ensemble, ["method1", "method2"]
    one = explain(scorer, image, "method1", members, ens, C.ExplainConfig())
    assert one["p_fake"] == pytest.approx(float(scorer.p_fake([image], "method1")[0]), abs=1e-5)
    assert one["label"] == scorer.answers([image], C.EnsembleConfig(members=["method1"]))[0]["label"]
    both = explain(scorer, image, "ensemble", members, ens, C.ExplainConfig())
    assert both["adapter"] == "ensemble" and not both["degraded"]
    assert both["p_fake"] == pytest.approx(scorer.answers([image], ens)[0]["p_fake"], abs=1e-5)
    assert set(both["members"]) == {"method1", "method2"}
    # the ensemble's map: its members' maps weighted 3:1, peaking at 1
    m2 = explain(scorer, image, "method2", members, ens, C.ExplainConfig())
    mix = 3 * np.asarray(one["explanation"]["grid"]) + np.asarray(m2["explanation"]["grid"])
    np.testing.assert_allclose(both["explanation"]["grid"], mix / mix.max(), atol=2e-3)
    e = both["explanation"]
    grid = np.asarray(e["grid"])
    assert list(grid.shape) == e["grid_shape"] == list(token_shape(image))
    assert grid.min() >= 0 and grid.max() == pytest.approx(1.0)
    png = Image.open(io.BytesIO(base64.b64decode(e["overlay_png_base64"])))
    assert png.format == "PNG" and min(png.size) >= 256
    for b in e["region_boxes"]:
        assert 0 <= b["x"] < b["x"] + b["w"] <= 1 and 0 <= b["y"] < b["y"] + b["h"] <= 1 and b["score"] >= 0.5


def test_an_ensemble_member_that_is_not_loaded_follows_the_ensembles_policy(tiny_model, adapters, image):
    from aigd.errors import MemberFailed
    from aigd.scorer import Scorer

    s = Scorer(C.ScoringConfig(model=C.ModelConfig(name_or_path=str(tiny_model), load_in_4bit=False),
                               image=C.ImagePolicy(**SERVE_POLICY),
                               adapters={k: str(adapters[k]) for k in ("method1", "mismatched")}),
               on_adapter_error="skip")
    members = ["method1", "mismatched"]
    with pytest.raises(MemberFailed, match="mismatched"):
        explain(s, image, "ensemble", members, C.EnsembleConfig(on_member_failure="fail"), C.ExplainConfig())
    degraded = explain(s, image, "ensemble", members, C.EnsembleConfig(on_member_failure="degrade"),
                       C.ExplainConfig(method="input_x_gradient"))
    assert degraded["degraded"] and list(degraded["members_failed"]) == ["mismatched"]
    assert degraded["members_used"] == ["method1"] and list(degraded["explanation"]["peak_logit"]) == ["method1"]


class Passes:
    """Counts an explanation's forward passes (`Scorer.using` without the caller holding the lock;
    scoring holds it) and runs `at(n)` before pass n."""

    def __init__(self, scorer, monkeypatch, at=lambda n: None):
        self.n, self.at, real = 0, at, scorer.using

        def using(member, locked=False):
            if not locked:
                self.n += 1
                self.at(self.n)
            return real(member, locked)

        monkeypatch.setattr(scorer, "using", using)


def test_a_deadline_or_a_cancel_stops_the_explanation_before_its_next_pass(scorer, image, monkeypatch):
    cfg = C.ExplainConfig(occlusion_regions=12, chunk=1)
    with pytest.raises(DeadlineExceeded, match="deadline after 0 passes"):
        attribute(scorer, image, "method1", "occlusion", cfg, Budget(time.monotonic() - 1))
    budget = Budget()
    passes = Passes(scorer, monkeypatch, at=lambda n: n == 4 and budget.stop.set())
    with pytest.raises(DeadlineExceeded, match="cancelled after 3 passes"):
        attribute(scorer, image, "method1", "occlusion", cfg, budget)
    assert passes.n == 4  # the fourth was refused; no fifth began
    assert scorer._lock.acquire(blocking=False)  # and the lock is free
    scorer._lock.release()


def test_scoring_runs_between_the_passes_of_an_explanation(scorer, image, monkeypatch):
    """/v1/detect never waits for a whole explanation: each pass takes the lock on its own."""
    passes, during = Passes(scorer, monkeypatch), []
    total = 1 + token_shape(image)[0] * token_shape(image)[1]  # the unaltered image, then one region per pass

    def explain_slowly():
        attribute(scorer, image, "method1", "occlusion", C.ExplainConfig(occlusion_regions=12, chunk=1))

    t = threading.Thread(target=explain_slowly)
    t.start()
    while t.is_alive():
        scorer.p_fake([image], "method2")
        during.append(passes.n)
    t.join()
    assert passes.n == total
    assert any(0 < n < total for n in during), during  # a detect call finished between two passes


def test_a_version_switched_out_mid_explanation_is_refused_not_mixed(tiny_model, tmp_path, image, monkeypatch):
    from aigd.scorer import Scorer

    entry = tmp_path / "method1"
    first = make_adapter(tiny_model, entry, seed=11, temperature=1.0, method="method1")
    second = make_adapter(tiny_model, entry, seed=12, temperature=1.0, method="method1")
    s = Scorer(C.ScoringConfig(model=C.ModelConfig(name_or_path=str(tiny_model), load_in_4bit=False),
                               image=C.ImagePolicy(**SERVE_POLICY), adapters={"method1": str(first)}))
    Passes(s, monkeypatch, at=lambda n: n == 3 and s.switch("method1", str(second)))
    with pytest.raises(AdapterUnavailable, match="switched out"):
        attribute(s, image, "method1", "occlusion", C.ExplainConfig(chunk=1))
    assert s.member("method1").version.uri == str(second)


def test_normalized_map_boxes_and_overlay():
    scores = np.array([[0.0, -2.0, 0.5], [0.1, 1.0, 0.9], [0.0, 0.0, -0.1]])
    grid = normalized(scores)
    assert grid[1, 1] == 1.0 and grid[0, 2] == 0.5 and grid[0, 1] == 0  # evidence against fake shows as none
    assert normalized(-np.ones((2, 2))).tolist() == [[0, 0], [0, 0]]
    boxes = region_boxes(np.array([[0, 0, 0.9], [0, 0, 0.6], [0.7, 0, 0]]), 0.5, 5)
    assert [(b["x"], b["y"], b["w"], b["h"]) for b in boxes] == [(2 / 3, 0, 1 / 3, 2 / 3), (0, 2 / 3, 1 / 3, 1 / 3)]
    png = Image.open(io.BytesIO(overlay_png(np.zeros((56, 84, 3), np.uint8), np.eye(2, 3), boxes)))
    assert png.size == (84 * 5, 56 * 5)


def test_localization_figures_on_known_maps():
    mask = np.zeros((56, 84), bool)
    mask[:28, 28:56] = True
    perfect = np.zeros((2, 3))
    perfect[0, 1] = 1.0
    assert localization(perfect, mask, 0.5) == {"pixel_auc": 1.0, "iou": 1.0}
    assert localization(-perfect + 1, mask, 0.5)["pixel_auc"] == 0.0
    half = np.zeros((2, 3))
    half[0, 1:] = 1.0
    assert localization(half, mask, 0.5)["iou"] == pytest.approx(0.5)
    png = io.BytesIO()
    Image.fromarray((mask * 255).astype(np.uint8)).resize((168, 112), Image.Resampling.NEAREST).save(png, "PNG")
    assert (mask_view(png.getvalue(), (56, 84)) == mask).all()


def test_deletion_curves_start_at_the_unaltered_answer(scorer, image):
    h, w = token_shape(image)
    scores = np.arange(h * w, dtype=float).reshape(h, w)
    base = _baseline(image, C.ExplainConfig())
    top, rand = deletion(scorer, image, base, "method1", scores, [0.0, 0.5], 2, np.random.default_rng(0))
    p0 = float(scorer.p_fake([image], "method1")[0])
    assert top[0] == pytest.approx(p0, abs=1e-5) and rand[0] == pytest.approx(p0, abs=1e-5)
    out = filled(image, base, np.array([w * h - 1]), w)  # the most attributed token is the last one
    assert (out[-28:, -28:] == base[-28:, -28:]).all() and (out[:-28] == image[:-28]).all()
    half = filled(image, base, np.argsort(-scores.ravel())[:round(0.5 * h * w)], w)
    assert top[1] == pytest.approx(float(scorer.p_fake([half], "method1")[0]), abs=1e-5)
