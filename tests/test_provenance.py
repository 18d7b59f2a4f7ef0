"""What a file declares about its origin (aigd.provenance), from fixtures built here: a C2PA manifest
signed under a certificate chain made by the test, its tampered copy, XMP, generator text chunks,
camera EXIF, and hostile metadata blocks that must cost the reader nothing and the image its score."""

import json

import numpy as np
import pytest

from aigd.config import DecodeLimits, ImagePolicy, ProvenanceConfig
from aigd.dev import provenance_files as P
from aigd.image_view import prepare
from aigd.provenance import origin, read, table_columns
from helpers import photo


@pytest.fixture(scope="module")
def img():
    return photo(7, size=(320, 240))


@pytest.fixture(scope="module")
def signed(img):
    return P.c2pa_signed(P.encode(img, "JPEG", quality=90))


def test_a_signed_c2pa_manifest_is_read_and_validated(signed):
    block = read(signed)
    c = block["c2pa"]
    assert c["present"] and c["validation_state"] == "Valid" and c["validation_failures"] == []
    assert (c["claim_generator"], c["signer"], c["issuer"]) == ("aigd-demo-generator 1.0", "aigd demo signer",
                                                                "aigd demo")
    assert c["digital_source_type"] == "trainedAlgorithmicMedia" and c["actions"] == ["c2pa.created"]
    assert block["declared"] == "ai" and block["error"] is None
    assert any("C2PA (Valid)" in e and "trainedAlgorithmicMedia" in e for e in block["evidence"])


def test_a_tampered_copy_fails_validation_but_still_says_what_it_claims(signed):
    c = read(P.tampered(signed))["c2pa"]
    assert c["validation_state"] == "Invalid" and "assertion.dataHash.mismatch" in c["validation_failures"]
    assert c["digital_source_type"] == "trainedAlgorithmicMedia"


def test_a_signer_under_a_configured_trust_anchor_reads_trusted(signed, tmp_path):
    anchors = tmp_path / "anchors.pem"
    anchors.write_bytes(P.signing_chain()[2])
    assert read(signed, ProvenanceConfig(c2pa_trust_anchors=str(anchors)))["c2pa"]["validation_state"] == "Trusted"


def test_c2pa_on_png_and_a_camera_source_type(img):
    block = read(P.c2pa_signed(P.encode(img, "PNG"), "image/png", source_type="digitalCapture"))
    assert block["c2pa"]["validation_state"] == "Valid" and block["declared"] == "camera"


@pytest.mark.parametrize("fmt, form", [("JPEG", "attribute"), ("JPEG", "element"), ("PNG", "attribute"),
                                       ("WEBP", "element")])
def test_xmp_digital_source_type_in_every_container(img, fmt, form):
    block = read(P.with_xmp(img, fmt, "trainedAlgorithmicMedia", form))
    assert block["xmp_digital_source_type"] == "trainedAlgorithmicMedia" and block["declared"] == "ai"
    assert read(P.with_xmp(img, fmt, "compositeWithTrainedAlgorithmicMedia", form))["declared"] == "ai"
    assert read(P.with_xmp(img, fmt, "compositeSynthetic", form))["declared"] == "edited"


def test_generator_text_names_the_tool_and_keeps_the_prompt_only_when_configured(img):
    a1111 = P.png_with_text(img, {"parameters": P.A1111_PARAMETERS})
    block = read(a1111)
    assert block["generator_text"] == {"tool": "Stable Diffusion web UI", "keys": ["parameters"]}
    assert block["declared"] == "ai" and "lighthouse" not in json.dumps(block)
    text = read(a1111, ProvenanceConfig(include_generator_text=True))["generator_text"]["text"]
    assert "lighthouse" in text["parameters"]
    comfy = read(P.png_with_text(img, {"prompt": P.COMFYUI_PROMPT, "workflow": "{}"}, compressed=True))
    assert comfy["generator_text"]["tool"] == "ComfyUI" and comfy["declared"] == "ai"
    # the web UIs' parameter line under a key no list names (the class, not the key)
    other = read(P.png_with_text(img, {"Description": P.A1111_PARAMETERS}))
    assert other["generator_text"] == {"tool": "Stable Diffusion web UI", "keys": ["Description"]}


@pytest.mark.parametrize("little_endian", [False, True])
def test_a_web_uis_jpeg_keeps_its_parameters_in_a_utf16_user_comment(img, little_endian):
    block = read(P.a1111_jpeg(img, little_endian))
    assert block["generator_text"] == {"tool": "Stable Diffusion web UI", "keys": ["exif"]} and block["declared"] == "ai"


def test_an_oversized_extended_xmp_does_not_hide_the_main_packet(img):
    block = read(P.extended_xmp_jpeg(img, extension_kb=600))
    assert block["xmp_digital_source_type"] == "trainedAlgorithmicMedia" and block["declared"] == "ai"
    assert block["error"] is None  # found in the main packet: the extension is never parsed


def test_the_image_data_of_a_large_png_is_not_metadata(img):
    """A PNG of 1,500 IDAT chunks (libpng's 8 KB each: a 12 MB file) with a text chunk after them."""
    from aigd.images import png_spans

    plain = P.png_with_text(img, {"parameters": P.A1111_PARAMETERS})
    spans = list(png_spans(plain))
    ihdr = plain[:spans[1][1]]
    idat = b"".join(plain[s:e] for k, s, e in spans if k == b"IDAT")
    text = b"".join(plain[s:e] for k, s, e in spans if k == b"tEXt")
    empty = P._png_chunk(b"IDAT", b"")
    many = ihdr + idat + empty * 1500 + text + P._png_chunk(b"IEND", b"")
    assert len(list(png_spans(many))) > 1500
    block = read(many)
    assert block["error"] is None and block["declared"] == "ai"


def test_fill_bytes_cost_nothing_and_the_decoder_refuses_a_run_of_them(img):
    from aigd.errors import ImageRejected

    data = P.fill_bytes_jpeg(img, mb=4)
    assert read(data)["error"] is None  # a run of fill bytes is one step for the reader
    with pytest.raises(ImageRejected, match="fill or stray bytes"):
        prepare(data, DecodeLimits.preset("serving"), ImagePolicy())


def test_exif_camera_and_editor(img):
    camera = read(P.camera_jpeg(img))
    assert camera["exif"] == {"make": "Canon", "model": "Canon EOS R6"} and camera["declared"] == "camera"
    edited = read(P.camera_jpeg(img, software="Adobe Photoshop 26.1 (Macintosh)"))
    assert edited["declared"] == "edited" and edited["exif"]["software"].startswith("Adobe Photoshop")
    plain = read(P.encode(img, "PNG"))
    assert plain == {"declared": "none", "evidence": [], "c2pa": {"present": False}, "xmp_digital_source_type": None,
                     "generator_text": None, "exif": None, "error": None}


@pytest.mark.parametrize("name", sorted(P.HOSTILE))
def test_hostile_metadata_is_an_error_in_the_block_and_the_image_still_decodes(img, name):
    data = P.HOSTILE[name](img)
    block = read(data)
    pixels = prepare(data, DecodeLimits.preset("serving"), ImagePolicy())
    assert pixels.dtype == np.uint8 and pixels.ndim == 3
    if name == "broken_exif":  # Pillow skips the bad tag: nothing to report, nothing declared
        assert block["error"] is None and block["declared"] == "none"
    else:
        assert block["error"], name
    assert len(json.dumps(block)) < 4000  # nothing of the hostile block's size is carried into the answer


def test_origin_and_table_columns(img):
    data = P.png_with_text(img, {"parameters": P.A1111_PARAMETERS})
    traced = origin(data, ProvenanceConfig())
    assert traced["image_sha256"] == __import__("hashlib").sha256(data).hexdigest()
    row = table_columns(traced)
    assert row["provenance_declared"] == "ai" and json.loads(row["provenance"]) == traced["provenance"]
    assert "provenance" not in origin(data, ProvenanceConfig(enabled=False))
    assert table_columns(None) == {"image_sha256": None, "provenance_declared": None, "provenance": None}


def test_metadata_never_changes_the_pixels_the_model_sees(img):
    """Provenance is read beside the score: the same pixels with and without metadata are the same input."""
    policy, limits = ImagePolicy(), DecodeLimits.preset("serving")
    plain = prepare(P.encode(img, "PNG"), limits, policy)
    for data in (P.png_with_text(img, {"parameters": P.A1111_PARAMETERS}), P.with_xmp(img, "PNG"),
                 P.huge_xmp(img), P.ztxt_bomb(img), P.c2pa_signed(P.encode(img, "PNG"), "image/png")):
        np.testing.assert_array_equal(prepare(data, limits, policy), plain)
