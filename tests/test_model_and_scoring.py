"""Tiny model loads offline through the Auto classes; scoring is one forward over two label logits."""

import numpy as np
import pytest
import torch
from PIL import Image

from aigd import batching, forward, image_view, prompt
from aigd.config import ImagePolicy, LoraConfig, ModelConfig
from aigd.decision import p_fake

POLICY = ImagePolicy(max_pixels=140 * 140, min_pixels=56 * 56)


def _images(seed=0):
    """Prepared (policy-sized) images, as every scorer hands them to the model."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for w, h in ((112, 112), (168, 112), (112, 140))]


def _p(model, batch, ids, temperature=1.0):
    with torch.no_grad():
        return p_fake(forward.pair_logits(forward.answer_logits(model, batch), ids).numpy(), temperature)


def test_tiny_model_loads_offline_with_auto_classes(tiny_model, monkeypatch):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForImageTextToText.from_pretrained(tiny_model)
    proc = AutoProcessor.from_pretrained(tiny_model)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(proc).__name__ == "Qwen2_5_VLProcessor"
    assert "<|vision_start|><|image_pad|><|vision_end|>Real/Fake?" in prompt.prompt_text(proc, POLICY)


def test_real_and_fake_are_single_tokens(processor):
    real, fake = prompt.label_token_ids(processor.tokenizer)
    assert real != fake
    assert processor.tokenizer.decode([real]) == "Real" and processor.tokenizer.decode([fake]) == "Fake"


def test_score_equals_hand_computation_on_logits(tiny_model, processor):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model).eval()
    ids = prompt.label_token_ids(processor.tokenizer)
    img = _images()[0]
    batch = batching.model_batch(processor, [img], POLICY)
    with torch.no_grad():
        inputs = {k: batch[k] for k in forward.MODEL_INPUTS}
        inputs["pixel_values"] = batching.normalize_pixels(batch["pixel_values"], batch["pixel_affine"])
        full = model(**inputs).logits[0, -1]
    z_real, z_fake = full[ids[0]].item(), full[ids[1]].item()
    by_hand = np.exp(z_fake) / (np.exp(z_real) + np.exp(z_fake))
    assert abs(_p(model, batch, ids)[0] - by_hand) < 1e-6
    t = 2.5
    by_hand_t = 1 / (1 + np.exp(-(z_fake - z_real) / t))
    assert abs(_p(model, batch, ids, t)[0] - by_hand_t) < 1e-6


def test_left_padded_batch_scores_like_single_images(tiny_model, processor):
    from aigd.model import load_for_training

    model, proc, _ = load_for_training(ModelConfig(name_or_path=str(tiny_model), load_in_4bit=False,
                                                   gradient_checkpointing=False), LoraConfig(), torch.device("cpu"))
    with torch.no_grad():  # make LoRA non-trivial so the adapter path is exercised too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.eval()
    ids = prompt.label_token_ids(proc.tokenizer)
    imgs = _images(1)
    rows = batching.encode(proc, imgs, POLICY)

    def to_batch(r):
        return batching.collate(r, proc.tokenizer.pad_token_id, batching.pixel_affine(proc))

    batched = _p(model, to_batch(rows), ids)
    single = [_p(model, to_batch({k: [v[i]] for k, v in rows.items()}), ids)[0] for i in range(3)]
    assert len({len(x) for x in rows["input_ids"]}) > 1, "test needs prompts of different lengths"
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_uint8_patches_normalised_at_the_model_equal_the_processors_floats(processor):
    imgs = [image_view.prepare_image(Image.fromarray(im), POLICY) for im in _images(1)]
    text = prompt.prompt_text(processor, POLICY)
    want = processor(text=[text] * len(imgs), images=[Image.fromarray(im) for im in imgs], return_tensors="pt",
                     padding=True, padding_side="left")
    got = batching.model_batch(processor, imgs, POLICY)
    assert got["pixel_values"].dtype == torch.uint8
    pixels = batching.normalize_pixels(got["pixel_values"], got["pixel_affine"])
    torch.testing.assert_close(pixels, want["pixel_values"].float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(got["input_ids"], want["input_ids"])
    torch.testing.assert_close(got["attention_mask"], want["attention_mask"])


def test_image_policy_keeps_aspect_on_the_28px_grid():
    assert image_view.target_size(1024, 768, ImagePolicy(max_pixels=512 * 512)) == (588, 420)
    w, h = image_view.target_size(1024, 1024, ImagePolicy(max_pixels=512 * 512))
    assert w == h and w % 28 == 0 and w * h <= 512 * 512
    assert image_view.target_size(112, 140, POLICY) == (112, 140)  # on-grid, in budget: untouched
    with pytest.raises(ValueError, match="prepared"):  # the model only ever sees policy-sized images
        batching.encode(None, [np.zeros((100, 100, 3), np.uint8)], POLICY)


def test_unavailable_backend_says_what_is_missing():
    from aigd.errors import BackendUnavailable
    from aigd.model import resolve_backend

    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    with pytest.raises(BackendUnavailable, match="CUDA"):
        resolve_backend(ModelConfig(backend="unsloth"))
    assert resolve_backend(ModelConfig(backend="auto")) == "hf"


def test_tiny_base_answers_real_or_fake_but_knows_neither(tiny_model, processor, demo_data):
    """Like the 7B instruct model, the demo base puts its answer on the two label tokens (so Method 1's
    full-vocabulary loss starts near ln 2), and like any untrained base it cannot tell them apart."""
    import pyarrow.parquet as pq
    from transformers import AutoModelForImageTextToText

    from aigd.config import DataConfig, DecodeLimits
    from aigd.sampling import Catalog
    from aigd.metrics import roc_auc

    model = AutoModelForImageTextToText.from_pretrained(tiny_model).eval()
    ids = prompt.label_token_ids(processor.tokenizer)
    cfg = DataConfig(source="sid_parquet", path=str(demo_data), min_width=112, split_group_sep="/")
    table = pq.ParquetDataset(sorted(str(p) for p in (demo_data / "data").glob("*.parquet"))).read()
    rows = Catalog.of(cfg, table).select("all").to_pylist()[:120]
    images, labels = [], []
    for r in rows:
        try:
            images.append(image_view.prepare(r["image"]["bytes"], DecodeLimits(), POLICY))
            labels.append(r["label"])
        except Exception:
            continue  # the demo's truncated JPEGs
    with torch.no_grad():
        logits = torch.cat([forward.answer_logits(model, batching.model_batch(processor, images[i:i + 16], POLICY))
                            for i in range(0, len(images), 16)])
    probs = torch.softmax(logits, -1)
    mass = probs[:, list(ids)].sum(-1)
    ce = torch.nn.functional.cross_entropy(logits, torch.as_tensor(ids)[torch.as_tensor(labels)]).item()
    assert mass.min() > 0.9 and ce < 0.8  # ln 2 = 0.69; a random base starts at ln |vocab| = 6
    assert abs(roc_auc(np.asarray(labels), probs[:, ids[1]].numpy()) - 0.5) < 0.15
