"""Image files that declare where they came from, made here (no downloaded fixtures): a C2PA-signed
image under a certificate chain made on the spot, its tampered copy, XMP DigitalSourceType, a web UI's
PNG `parameters` chunk, camera EXIF; and the hostile metadata blocks the reader must survive. Used by
the tests, bench/hostile_inputs.py and the demo's samples."""

from __future__ import annotations

import datetime
import io
import json
import struct
import zlib
from functools import lru_cache

from PIL import Image, PngImagePlugin

IPTC = "http://cv.iptc.org/newscodes/digitalsourcetype/"


@lru_cache(maxsize=1)
def signing_chain() -> tuple[bytes, bytes, bytes]:
    """(leaf + CA certificates, leaf key, CA certificate) in PEM: ES256, with what c2pa requires of a
    signing certificate (digitalSignature, an extended key usage, subject and authority key ids)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def name(cn: str, org: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)])

    def cert(subject, key, issuer, signer, ca: bool, extra) -> x509.Certificate:
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
             .not_valid_after(now + datetime.timedelta(days=365))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
        for ext in extra:
            b = b.add_extension(ext, critical=isinstance(ext, x509.KeyUsage))
        return b.sign(signer, hashes.SHA256())

    ca_name = name("aigd demo CA (self-signed)", "aigd demo")
    ca = cert(ca_name, ca_key, ca_name, ca_key, True,
              [x509.KeyUsage(False, False, False, False, False, True, True, False, False)])
    leaf = cert(name("aigd demo signer", "aigd demo"), leaf_key, ca_name, ca_key, False,
                [x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                 x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]),
                 x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())])
    pem = [c.public_bytes(serialization.Encoding.PEM) for c in (leaf, ca)]
    key = leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    return pem[0] + pem[1], key, pem[1]


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def c2pa_signed(data: bytes, mime: str = "image/jpeg", source_type: str = "trainedAlgorithmicMedia",
                generator: str = "aigd-demo-generator") -> bytes:
    """`data` with a C2PA manifest: `c2pa.created` with the IPTC digital source type, signed ES256."""
    import c2pa

    certs, key, _ = signing_chain()
    signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(c2pa.C2paSigningAlg.ES256, certs, key, None))
    manifest = {"claim_generator_info": [{"name": generator, "version": "1.0"}], "title": "generated",
                "assertions": [{"label": "c2pa.actions", "data": {"actions": [
                    {"action": "c2pa.created", "digitalSourceType": IPTC + source_type}]}}]}
    out = io.BytesIO()
    with c2pa.Builder(manifest) as builder:
        builder.sign(signer, mime, io.BytesIO(data), out)
    return out.getvalue()


def tampered(signed_jpeg: bytes) -> bytes:
    """The signed JPEG with its pixels changed after signing (the manifest kept): the data hash breaks."""
    img = Image.open(io.BytesIO(signed_jpeg)).convert("RGB")
    img.paste((255, 0, 0), (0, 0, img.width // 3, img.height // 3))
    edited = encode(img, "JPEG", quality=90)
    return edited[:2] + _jpeg_app11(signed_jpeg) + edited[2:]


def _jpeg_app11(data: bytes) -> bytes:
    """The APP11 (JUMBF) segments of a JPEG, as they are."""
    out, pos = b"", 2
    while pos + 4 <= len(data) and data[pos] == 0xFF and data[pos + 1] != 0xDA:
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if data[pos + 1] == 0xEB:
            out += data[pos:pos + 2 + length]
        pos += 2 + length
    return out


def xmp_packet(source_type: str, form: str = "attribute") -> bytes:
    value = IPTC + source_type
    desc = (f'<rdf:Description rdf:about="" Iptc4xmpExt:DigitalSourceType="{value}"/>' if form == "attribute" else
            f'<rdf:Description rdf:about=""><Iptc4xmpExt:DigitalSourceType>{value}'
            '</Iptc4xmpExt:DigitalSourceType></rdf:Description>')
    return ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" '
            f'xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/">{desc}</rdf:RDF></x:xmpmeta>').encode()


def with_xmp(img: Image.Image, fmt: str, source_type: str = "trainedAlgorithmicMedia", form: str = "attribute") -> bytes:
    packet = xmp_packet(source_type, form)
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_itxt("XML:com.adobe.xmp", packet.decode())
        return encode(img, "PNG", pnginfo=info)
    return encode(img, fmt, xmp=packet)


def png_with_text(img: Image.Image, texts: dict[str, str], compressed: bool = False) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, text in texts.items():
        info.add_itxt(key, text, zip=True) if compressed else info.add_text(key, text)
    return encode(img, "PNG", pnginfo=info)


A1111_PARAMETERS = ("a photo of a lighthouse at dusk\nNegative prompt: blurry\nSteps: 30, Sampler: DPM++ 2M, "
                    "CFG scale: 7, Seed: 1234, Size: 512x512, Model: sd_xl_base_1.0")
COMFYUI_PROMPT = json.dumps({"3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 20}},
                             "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "flux1-dev"}}})


def a1111_jpeg(img: Image.Image, little_endian: bool = False) -> bytes:
    """A JPEG as AUTOMATIC1111/Forge save it: the parameters in EXIF UserComment, `UNICODE` + UTF-16."""
    exif = Image.Exif()
    text = A1111_PARAMETERS.encode("utf-16-le" if little_endian else "utf-16-be")
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + text
    return encode(img, "JPEG", quality=92, exif=exif)


def extended_xmp_jpeg(img: Image.Image, extension_kb: int = 600) -> bytes:
    """A small main XMP packet declaring trainedAlgorithmicMedia, then extended XMP pieces (as
    Photoshop writes its DocumentAncestors history) adding up to `extension_kb`."""
    data = with_xmp(img, "JPEG")
    piece = 60_000
    body = b" " * (extension_kb * 1024)
    segments = b"".join(_jpeg_segment(0xE1, b"http://ns.adobe.com/xmp/extension/\x00" + b"0" * 32
                                      + struct.pack(">II", len(body), off) + body[off:off + piece])
                        for off in range(0, len(body), piece))
    return data[:2] + segments + data[2:]


def fill_bytes_jpeg(img: Image.Image, mb: int = 19) -> bytes:
    """A JPEG with `mb` MB of 0xFF fill bytes before its first table (legal between markers)."""
    data = encode(img, "JPEG", quality=90)
    dqt = data.index(b"\xff\xdb")
    return data[:dqt] + b"\xff" * (mb * 2**20) + data[dqt:]


def camera_jpeg(img: Image.Image, make: str = "Canon", model: str = "Canon EOS R6", software: str = "") -> bytes:
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = make, model
    if software:
        exif[0x0131] = software
    return encode(img, "JPEG", quality=92, exif=exif)


def _jpeg_segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_insert(png: bytes, chunks: bytes) -> bytes:
    """`chunks` right after IHDR."""
    end = 8 + 8 + 13 + 4
    return png[:end] + chunks + png[end:]


def declare(data: bytes, kind: str) -> bytes:
    """The same file, pixels untouched, with one kind of metadata added: `c2pa` (a signed manifest,
    trainedAlgorithmicMedia), `generator_text` (a web UI's parameters), `xmp` (DigitalSourceType
    trainedAlgorithmicMedia) or `camera` (EXIF Make/Model)."""
    jpeg = data.startswith(b"\xff\xd8")
    if kind == "c2pa":
        return c2pa_signed(data, "image/jpeg" if jpeg else "image/png")
    if kind == "generator_text" and not jpeg:
        return _png_insert(data, _png_chunk(b"tEXt", b"parameters\x00" + A1111_PARAMETERS.encode()))
    if kind in ("xmp", "generator_text"):
        packet = xmp_packet("trainedAlgorithmicMedia")
        if jpeg:
            return data[:2] + _jpeg_segment(0xE1, b"http://ns.adobe.com/xap/1.0/\x00" + packet) + data[2:]
        return _png_insert(data, _png_chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + packet))
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "Canon", "Canon EOS R6"
    block = exif.tobytes()
    if jpeg:
        return data[:2] + _jpeg_segment(0xE1, block) + data[2:]
    return _png_insert(data, _png_chunk(b"eXIf", block[6:] if block.startswith(b"Exif") else block))


# ---------------------------------------------------------------- hostile metadata (the image itself is fine)


def jumbf_garbage(img: Image.Image) -> bytes:
    """A JPEG whose APP11 holds a JUMBF superbox header with a c2pa label and random contents."""
    import numpy as np

    box = b"JP" + b"\x00\x01" + b"\x00\x00\x00\x01" + struct.pack(">I", 4000) + b"jumb" + b"\x00" * 4 + b"jumdc2pa"
    body = box + np.random.default_rng(3).bytes(3000)
    data = encode(img, "JPEG", quality=90)
    return data[:2] + _jpeg_segment(0xEB, body) + data[2:]


def c2pa_truncated(img: Image.Image) -> bytes:
    """A signed JPEG whose manifest store is cut in half (the pixels intact)."""
    signed = c2pa_signed(encode(img, "JPEG", quality=90))
    app11 = _jpeg_app11(signed)
    first = app11[:4 + (int.from_bytes(app11[2:4], "big") - 2) // 2]
    first = first[:2] + struct.pack(">H", len(first) - 2) + first[4:]
    plain = encode(img, "JPEG", quality=90)
    return plain[:2] + first + plain[2:]


def huge_xmp(img: Image.Image, mb: int = 10) -> bytes:
    """A PNG whose iTXt XMP packet inflates to `mb` MB (a few KB on the wire)."""
    packet = b'<x:xmpmeta xmlns:x="adobe:ns:meta/">' + b" " * (mb * 2**20) + b"</x:xmpmeta>"
    payload = b"XML:com.adobe.xmp\x00\x01\x00\x00\x00" + zlib.compress(packet, 9)
    return _png_insert(encode(img, "PNG"), _png_chunk(b"iTXt", payload))


def many_text_chunks(img: Image.Image, n: int = 5000) -> bytes:
    """A PNG with n text chunks before its image data (within the decoder's chunk cap)."""
    return _png_insert(encode(img, "PNG"), _png_chunk(b"tEXt", b"k\x00v") * n)


def ztxt_bomb(img: Image.Image, mb: int = 64) -> bytes:
    """A `parameters` zTXt chunk that inflates to `mb` MB."""
    payload = b"parameters\x00\x00" + zlib.compress(b"Steps: 1, Sampler: x " + b"a" * (mb * 2**20), 9)
    return _png_insert(encode(img, "PNG"), _png_chunk(b"zTXt", payload))


def broken_exif(img: Image.Image) -> bytes:
    """A JPEG whose EXIF block claims an IFD far past its end."""
    exif = b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\x00\x01\x01\x31\x00\x02\x7f\xff\xff\xff\x00\x00\x00\x10\x00\x00\x00\x00"
    data = encode(img, "JPEG", quality=90)
    return data[:2] + _jpeg_segment(0xE1, exif) + data[2:]


def slow_to_read(img: Image.Image) -> bytes:
    """The most text the default limits read in full (60 zTXt chunks of 256 KB, 80 KB on the wire):
    tens of milliseconds of reading, against a few for decoding the image itself."""
    text = (b"lorem ipsum dolor " * 16000)[:256 * 1024 - 10]
    return _png_insert(encode(img, "PNG"), _png_chunk(b"zTXt", b"note\x00\x00" + zlib.compress(text, 9)) * 60)


HOSTILE = {"jumbf_garbage": jumbf_garbage, "c2pa_truncated": c2pa_truncated, "huge_xmp_10mb": huge_xmp,
           "5000_text_chunks": many_text_chunks, "ztxt_bomb_64mb": ztxt_bomb, "broken_exif": broken_exif}
