"""What an image file declares about its origin, read from its bytes beside every score.

Generators and editors write it in several places: C2PA Content Credentials (a signed manifest whose
actions may declare digital source type `trainedAlgorithmicMedia`), the IPTC DigitalSourceType in
XMP, the text chunks image tools leave in a PNG (Stable Diffusion web UIs' `parameters`, ComfyUI's
`prompt`/`workflow`), EXIF Software/Make/Model. Labelling platforms read these first. Here they are
reported, never scored: metadata can be stripped or forged, and its absence means nothing.

Every reader is bounded (segments walked, XMP and text sizes, the C2PA store's size) and a failure
is reported in `error`, never raised: a hostile metadata block must not cost the image its score.
C2PA goes through the maintained c2pa-python bindings; the containers are walked here because
Pillow reads every chunk before the image data without a limit and drops what it does not know.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import warnings
import zlib
from functools import lru_cache
from pathlib import Path

from PIL import Image

from aigd.config import DecodeLimits, ProvenanceConfig
from aigd.images import png_spans

log = logging.getLogger(__name__)
# Pillow warns once per tag it skips in a malformed EXIF block (untrusted files have many); the block's
# error is what matters. Set once here: catch_warnings() is not thread-safe, and reads run in threads.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")

DECLARED = ("ai", "edited", "camera", "none")  # strongest first
IPTC = "http://cv.iptc.org/newscodes/digitalsourcetype/"
# IPTC digital source types (cv.iptc.org/newscodes/digitalsourcetype) by what they declare; the
# others (digitalArt, screenCapture, virtualRecording, print ...) declare none of the three.
SOURCE_TYPES = {
    # a composite with AI-made elements holds AI content: for a label, that is what matters
    "ai": {"trainedAlgorithmicMedia", "algorithmicMedia", "compositeWithTrainedAlgorithmicMedia"},
    "edited": {"compositeSynthetic", "algorithmicallyEnhanced", "compositeCapture", "humanEdits", "minorHumanEdits",
               "dataDrivenMedia"},
    "camera": {"digitalCapture", "computationalCapture", "negativeFilm", "positiveFilm"},
}
# C2PA actions that say the content was changed after capture or creation.
EDIT_ACTIONS = {"c2pa.edited", "c2pa.color_adjustments", "c2pa.cropped", "c2pa.drawing", "c2pa.filtered",
                "c2pa.resized", "c2pa.orientation", "c2pa.placed", "c2pa.removed", "c2pa.converted"}
# PNG text keys image-generation tools write (A1111/Forge/SD.Next, ComfyUI, InvokeAI, Fooocus, NovelAI).
GENERATOR_KEYS = {"parameters": "Stable Diffusion web UI", "prompt": "ComfyUI", "workflow": "ComfyUI",
                  "invokeai_metadata": "InvokeAI", "sd-metadata": "InvokeAI", "dream": "InvokeAI",
                  "fooocus_scheme": "Fooocus", "generation_data": "Stable Diffusion tool"}
# The tools' text itself, wherever it is (a JPEG's EXIF UserComment, a chunk under another key):
# the web UIs' parameter line and ComfyUI's node graph.
GENERATOR_TEXT = ((re.compile(r"\bSteps: \d+, Sampler: "), "Stable Diffusion web UI"),
                  (re.compile(r'"class_type"\s*:'), "ComfyUI"))
AI_SOFTWARE = re.compile(r"midjourney|dall[-·]?e|stable ?diffusion|novelai|firefly|imagen|flux|"
                         r"comfyui|automatic1111|invokeai|fooocus|leonardo|ideogram", re.I)
EDIT_SOFTWARE = re.compile(r"photoshop|lightroom|gimp|snapseed|pixelmator|affinity|canva|paint\.net|"
                           r"capture one|darktable|rawtherapee|luminar|picsart|facetune", re.I)
_DST = re.compile(rb"DigitalSourceType(?:\s*=\s*[\"']|>|[^>]{0,200}?rdf:resource\s*=\s*[\"'])\s*([^\"'<\s]+)")
_XMP_MAIN = b"http://ns.adobe.com/xap/1.0/\x00"
_XMP_EXTENSION = b"http://ns.adobe.com/xmp/extension/\x00"
_MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}  # the containers walked for JUMBF
EXIF_TAGS = {"software": 0x0131, "make": 0x010F, "model": 0x0110}
_EXIF_MAX = 65_533  # a JPEG's APP1 payload at most: what any EXIF writer fits its block into
_EXIF_VALUE_MAX = 1024  # characters kept of a Software/Make/Model value
_PNG_CHUNKS_MAX = DecodeLimits().max_png_chunks


class MetadataLimit(ValueError):
    """A metadata block over its limit: reported in `error`, the rest still read."""


class _Found:
    """The raw metadata a container holds: XMP packets, text chunks, EXIF, the C2PA store's size."""

    def __init__(self):
        self.xmp: list[bytes] = []
        self.xmp_extension: list[bytes] = []  # a JPEG's extended XMP, in pieces
        self.texts: dict[str, str] = {}
        self.exif: bytes | None = None
        self.jumbf_bytes = 0
        self.errors: list[str] = []


# ---------------------------------------------------------------- containers


_JPEG_FILL = re.compile(rb"\xff+")


def _jpeg(data: bytes, cfg: ProvenanceConfig, found: _Found) -> None:
    """APPn and COM segments up to the first scan; every marker counts against max_segments."""
    pos, n = 2, 0
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        if (n := n + 1) > cfg.max_segments:
            found.errors.append(f"more than {cfg.max_segments} JPEG markers before the image data")
            return
        pos = _JPEG_FILL.match(data, pos).end() - 1  # fill bytes: any number of 0xFF before a marker
        marker = data[pos + 1] if pos + 1 < len(data) else 0xDA
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker == 0xDA:
            return
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        body = data[pos + 4:pos + 2 + length]
        if marker == 0xE1 and body.startswith(b"Exif\x00\x00"):
            found.exif = found.exif or body
        elif marker == 0xE1 and body.startswith(_XMP_MAIN):
            found.xmp.append(body[len(_XMP_MAIN):])
        elif marker == 0xE1 and body.startswith(_XMP_EXTENSION):  # GUID(32) full length(4) offset(4), then a piece
            found.xmp_extension.append(body[len(_XMP_EXTENSION) + 40:])
        elif marker == 0xEB:  # APP11: JUMBF boxes, where C2PA manifests live
            found.jumbf_bytes += len(body)
        elif marker == 0xFE:
            _text(found, cfg, "comment", body)
        pos += 2 + length


def _exif_block(found: _Found, block: bytes) -> None:
    """The first EXIF block, if it is no larger than a JPEG's can be (one 64 KB segment)."""
    if len(block) > _EXIF_MAX:
        found.errors.append(f"EXIF block of {len(block)} bytes is over {_EXIF_MAX}; not read")
    elif found.exif is None:
        found.exif = block


def _png(data: bytes, cfg: ProvenanceConfig, found: _Found) -> None:
    """Text, eXIf and caBX chunks; image data (IDAT, fdAT) is skipped without being copied, and counts
    only against the decoder's own chunk cap (which refuses the file beyond it anyway)."""
    texts = n = 0
    for total, (kind, start, end) in enumerate(png_spans(data)):
        if total >= _PNG_CHUNKS_MAX:
            found.errors.append(f"more than {_PNG_CHUNKS_MAX} PNG chunks; the rest not read")
            return
        if kind in (b"IDAT", b"fdAT"):
            continue
        if (n := n + 1) > cfg.max_segments:
            found.errors.append(f"more than {cfg.max_segments} PNG chunks besides the image data")
            return
        payload = data[start + 8:end - 4]
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            if (texts := texts + 1) > cfg.max_text_chunks:
                found.errors.append(f"more than {cfg.max_text_chunks} PNG text chunks; the rest not read")
                return
            try:
                key, text = _png_text(kind, payload, max(cfg.max_text_kb, cfg.max_xmp_kb) * 1024)
            except (MetadataLimit, zlib.error, ValueError, IndexError) as e:
                found.errors.append(f"PNG {kind.decode()} chunk: {e}")
                continue
            if key == "XML:com.adobe.xmp":
                found.xmp.append(text)
            else:
                _text(found, cfg, key, text)
        elif kind == b"eXIf":
            _exif_block(found, payload)
        elif kind == b"caBX":
            found.jumbf_bytes += len(payload)


def _png_text(kind: bytes, payload: bytes, limit: int) -> tuple[str, bytes]:
    key, _, rest = payload.partition(b"\x00")
    if kind == b"tEXt":
        return key.decode("latin-1"), rest[:limit + 1]
    if kind == b"zTXt":
        return key.decode("latin-1"), _inflate(rest[1:], limit)
    compressed, rest = rest[0], rest[2:]  # iTXt: flag, method, language\0, translated keyword\0, text
    text = rest.split(b"\x00", 2)[-1]
    return key.decode("latin-1"), _inflate(text, limit) if compressed else text[:limit + 1]


def _inflate(data: bytes, limit: int) -> bytes:
    """At most limit + 1 bytes: a zlib bomb costs nothing, and an oversized text shows as such."""
    return zlib.decompressobj().decompress(data, limit + 1)


def _webp(data: bytes, cfg: ProvenanceConfig, found: _Found) -> None:
    pos, n = 12, 0
    while pos + 8 <= len(data):
        if (n := n + 1) > cfg.max_segments:
            found.errors.append(f"more than {cfg.max_segments} WebP chunks")
            return
        kind, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        body = data[pos + 8:pos + 8 + size]
        if kind == b"EXIF":
            _exif_block(found, body)
        elif kind == b"XMP ":
            found.xmp.append(body)
        elif kind == b"C2PA":
            found.jumbf_bytes += len(body)
        pos += 8 + size + (size & 1)


# ---------------------------------------------------------------- what the metadata says


def _text(found: _Found, cfg: ProvenanceConfig, key: str, text: bytes) -> None:
    if len(text) > cfg.max_text_kb * 1024:
        found.errors.append(f"text {key!r} over {cfg.max_text_kb} KB; not read")
        return
    found.texts[key] = text.decode("utf-8", "replace")


def _xmp_source_type(found: _Found, cfg: ProvenanceConfig) -> str | None:
    """From the main packet first; the extended one (Photoshop's history can fill it) only after,
    as one packet. A packet over the limit is reported and skipped, not the others with it."""
    limit = cfg.max_xmp_kb * 1024
    for packet in [*found.xmp, b"".join(found.xmp_extension)]:
        if len(packet) > limit:
            found.errors.append(f"XMP packet over the limit of {cfg.max_xmp_kb} KB; not read")
        elif match := _DST.search(packet):
            return match.group(1).decode("utf-8", "replace").rsplit("/", 1)[-1]
    return None


def _exif(found: _Found) -> tuple[dict | None, list[str]]:
    """Software/Make/Model, and the descriptive texts (where a JPEG from a web UI keeps its parameters)."""
    if not found.exif:
        return None, []
    exif = Image.Exif()
    exif.load(found.exif)
    out = {name: str(exif[tag])[:_EXIF_VALUE_MAX].strip("\x00 ") for name, tag in EXIF_TAGS.items() if exif.get(tag)}
    texts = [exif.get(0x010E), exif.get_ifd(0x8769).get(0x9286)]  # ImageDescription, UserComment
    return out or None, [_exif_text(t) for t in texts if t]


def _exif_text(value) -> str:
    """An EXIF text: UserComment starts with its character code (AUTOMATIC1111 and Forge write
    `UNICODE` then UTF-16, big-endian through piexif)."""
    if not isinstance(value, bytes):
        return str(value)
    code, text = value[:8], value[8:]
    if code == b"UNICODE\x00":
        if text[:2] in (b"\xff\xfe", b"\xfe\xff"):
            return text.decode("utf-16", "replace")
        little = text[1:64:2].count(0) > text[0:64:2].count(0)  # ASCII-range text: the zero bytes' side
        return text.decode("utf-16-le" if little else "utf-16-be", "replace")
    if code == b"JIS\x00\x00\x00\x00\x00":
        return text.decode("shift_jis", "replace")
    return (text if code == b"ASCII\x00\x00\x00" else value).decode("utf-8", "replace")


def _generator_text(found: _Found, exif_texts: list[str], cfg: ProvenanceConfig) -> dict | None:
    """The tool by the keys it writes; failing that, by its text wherever it is."""
    keys = [k for k in found.texts if k.lower() in GENERATOR_KEYS]
    texts = {k: found.texts[k] for k in keys}
    tool = GENERATOR_KEYS[keys[0].lower()] if keys else None
    candidates = [*found.texts.items(), *(("exif", t) for t in exif_texts)]
    for (where, text), (pattern, name) in ((c, p) for c in candidates for p in GENERATOR_TEXT):
        if tool is None and pattern.search(text):
            tool, keys, texts = name, [where], {where: text}
    if tool is None:
        return None
    return {"tool": tool, "keys": keys, **({"text": texts} if cfg.include_generator_text else {})}


@lru_cache(maxsize=4)
def _c2pa_settings(trust_anchors: str) -> str:
    # No remote manifests: the router must not fetch a URL a file names.
    settings = {"verify": {"remote_manifest_fetch": False, "ocsp_fetch": False}}
    if trust_anchors:
        settings["trust"] = {"trust_anchors": Path(trust_anchors).read_text()}
        settings["verify"]["verify_trust"] = True
    return json.dumps(settings)


def _c2pa_context(trust_anchors: str):
    """A context per read (0.25 ms): the provenance threads never share a native object."""
    import c2pa

    return c2pa.Context(c2pa.Settings.from_json(_c2pa_settings(trust_anchors)))


def _c2pa(data: bytes, fmt: str, cfg: ProvenanceConfig) -> dict:
    import c2pa

    with c2pa.Reader(_MIME[fmt], io.BytesIO(data), context=_c2pa_context(cfg.c2pa_trust_anchors)) as reader:
        store = json.loads(reader.json())
        state = reader.get_validation_state()
    manifest = store.get("manifests", {}).get(store.get("active_manifest"), {})
    actions = [a for assertion in manifest.get("assertions", []) if assertion.get("label", "").startswith("c2pa.actions")
               for a in assertion.get("data", {}).get("actions", [])]
    source_types = [a["digitalSourceType"].rsplit("/", 1)[-1] for a in actions if a.get("digitalSourceType")]
    generator = manifest.get("claim_generator") or " ".join(
        f"{g.get('name', '')} {g.get('version', '')}".strip() for g in manifest.get("claim_generator_info", [])[:1])
    sig = manifest.get("signature_info", {})
    # untrusted: a signer not under a configured trust anchor, which validation_state already says
    failures = list(dict.fromkeys(s["code"] for s in store.get("validation_status", [])
                                  if s.get("code") != "signingCredential.untrusted"))
    return {"present": True, "validation_state": state, "validation_failures": failures,
            "claim_generator": generator or None, "signer": sig.get("common_name"), "issuer": sig.get("issuer"),
            "digital_source_type": source_types[0] if source_types else None,
            "actions": [a.get("action") for a in actions]}


def _declared(block: dict) -> tuple[str, list[str]]:
    """The strongest declaration any source makes, and every source's line of evidence."""
    evidence, kinds = [], set()

    def source_type(where: str, value: str | None) -> None:
        for kind, names in SOURCE_TYPES.items():
            if value in names:
                kinds.add(kind)
                evidence.append(f"{where}: digital source type {value}")

    c = block["c2pa"]
    if c and c.get("present") and c.get("validation_state"):
        source_type(f"C2PA ({c['validation_state']})", c.get("digital_source_type"))
        if set(c.get("actions", [])) & EDIT_ACTIONS:
            kinds.add("edited")
            evidence.append(f"C2PA ({c['validation_state']}): actions {', '.join(sorted(set(c['actions']) & EDIT_ACTIONS))}")
    source_type("XMP", block["xmp_digital_source_type"])
    if g := block["generator_text"]:
        kinds.add("ai")
        evidence.append(f"{g['tool']} generation text ({', '.join(g['keys'])})")
    exif = block["exif"] or {}
    software = exif.get("software", "")
    if AI_SOFTWARE.search(software):
        kinds.add("ai")
        evidence.append(f"EXIF Software: {software}")
    elif EDIT_SOFTWARE.search(software):
        kinds.add("edited")
        evidence.append(f"EXIF Software: {software}")
    if exif.get("make") or exif.get("model"):
        kinds.add("camera")
        evidence.append("EXIF camera: " + " ".join(filter(None, (exif.get("make"), exif.get("model")))))
    return next((k for k in DECLARED if k in kinds), "none"), evidence


def empty(error: str | None = None) -> dict:
    """The block of a file nothing was read from (provenance off, a timeout)."""
    return {"declared": "none", "evidence": [], "c2pa": {"present": False}, "xmp_digital_source_type": None,
            "generator_text": None, "exif": None, "error": error}


def read(data: bytes, cfg: ProvenanceConfig = ProvenanceConfig()) -> dict:
    """The provenance block of an image's original bytes; never raises for what the bytes hold."""
    from aigd.images import sniff

    block, found = empty(), _Found()
    try:
        fmt = sniff(data)
    except Exception:
        return block  # not an image: the decoder says so
    walk = {"JPEG": _jpeg, "PNG": _png, "WEBP": _webp}.get(fmt)
    steps = [("metadata", lambda: walk and walk(data, cfg, found)),
             ("XMP", lambda: block.update(xmp_digital_source_type=_xmp_source_type(found, cfg))),
             ("EXIF", lambda: block.update(zip(("exif", "_exif_texts"), _exif(found)))),
             ("C2PA", lambda: _read_c2pa(data, fmt, cfg, found, block))]
    for name, step in steps:
        try:
            step()
        except MetadataLimit as e:
            found.errors.append(str(e))
        except Exception as e:  # a malformed block from an untrusted file: reported, not raised
            log.info("provenance %s unreadable: %s: %s", name, type(e).__name__, e)
            found.errors.append(f"{name} unreadable: {_short(e)}")
    try:
        block["generator_text"] = _generator_text(found, block.pop("_exif_texts", []), cfg)
        block["declared"], block["evidence"] = _declared(block)
    except Exception as e:  # a value of an unexpected type in a manifest: reported, not raised
        log.info("provenance summary failed: %s: %s", type(e).__name__, e)
        found.errors.append(f"summary unreadable: {_short(e)}")
        block.update(generator_text=None, declared="none", evidence=[])
    block["error"] = "; ".join(found.errors) or None
    return block


def _read_c2pa(data: bytes, fmt: str, cfg: ProvenanceConfig, found: _Found, block: dict) -> None:
    if not found.jumbf_bytes:
        return
    block["c2pa"] = {"present": True, "validation_state": None}
    if found.jumbf_bytes > cfg.max_c2pa_kb * 1024:
        raise MetadataLimit(f"C2PA manifest store of {found.jumbf_bytes} bytes exceeds the limit of "
                            f"{cfg.max_c2pa_kb} KB; not read")
    block["c2pa"] = _c2pa(data, fmt, cfg)


def _short(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def origin(data: bytes, cfg: ProvenanceConfig) -> dict:
    """What every answer carries about the bytes it scored: their SHA-256 and, unless turned off,
    the provenance block."""
    return {"image_sha256": sha256(data), **({"provenance": read(data, cfg)} if cfg.enabled else {})}


TABLE_COLUMNS = ("image_sha256", "provenance_declared", "provenance")


def table_columns(traced: dict | None) -> dict:
    """`origin` as flat columns of a results table (batch scoring, evaluation predictions): the
    declaration on its own to filter on, the whole block as JSON."""
    block = (traced or {}).get("provenance")
    return {"image_sha256": (traced or {}).get("image_sha256"),
            "provenance_declared": block["declared"] if block else None,
            "provenance": json.dumps(block) if block else None}
