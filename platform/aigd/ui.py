"""The web page for people: a Gradio client of the detector's HTTP API. It never loads a model;
everything it shows is what the API answered.

    make ui       # = .venv-ui/bin/python -m aigd.ui --api http://127.0.0.1:8000  -> http://127.0.0.1:7860

It runs in its own environment (.venv-ui: gradio and requests, this package without its
dependencies): Gradio pins Pillow below the release the API's decoder requires, and a client needs
none of torch, Ray or the model. Only this module, `aigd.client` and `aigd/__init__.py` are imported
there.

Tabs: Score (one image: each adapter's P(fake) and label, the ensemble's verdict with its threshold
and uncertain band, versions, latency; on request, the API's map of where the evidence is beside
it), Stability (the same image re-compressed and downscaled, scored in one batch call: does the
verdict flip?), Batch (several files -> a table and a CSV).
"""

from __future__ import annotations

import base64
import csv
import io
import os
import shutil
import tempfile
import time
from pathlib import Path

from PIL import Image

from aigd.client import API_KEY_ENV, ApiError, Client

# What people ask after "is it fake": does the answer survive a re-shared copy?
VARIANTS = (("original", None), ("JPEG q95", 95), ("JPEG q75", 75), ("JPEG q50", 50), ("JPEG q30", 30),
            ("downscaled 1/2", "half"))


def _band(answer: dict) -> str:
    band = answer.get("uncertain_band")
    return f"[{band[0]:.3f}, {band[1]:.3f})" if band else "none"


def verdict_markdown(answer: dict, latency_ms: float) -> str:
    return (f"## Verdict: **{answer['label'].upper()}**\n{_plain_words(answer)}"
            f"Ensemble P(fake) **{answer['p_fake']:.3f}** · threshold {answer['threshold']:.3f} · "
            f"uncertain band {_band(answer)} · members {', '.join(answer['members_used'])}  \n"
            f"Latency {latency_ms:.0f} ms round trip (model {answer['timing']['model_ms']:.0f} ms, "
            f"decode {answer['timing']['decode_ms']:.0f} ms) · request `{answer.get('request_id', '')}`")


def _plain_words(answer: dict) -> str:
    """What a person should take from the answer, before the figures."""
    lines = []
    if answer.get("degraded"):
        failed = ", ".join(answer["members_failed"])
        lines.append(f"> ⚠️ **Degraded answer**: {failed} could not answer, so this verdict comes from "
                     f"{', '.join(answer['members_used'])} alone. Try again before acting on it.")
    if answer["label"] == "uncertain":
        lines.append("> **Uncertain** means the detector cannot tell: P(fake) fell inside the band where its answers "
                     "are unreliable. Treat this image as unknown, not as real.")
    return "".join(line + "\n\n" for line in lines)


GONE = "These files were deleted after their answer (uploads are not kept): upload them again."

PROVENANCE_WORDS = {"ai": "says it was **made by AI**", "edited": "says it was **edited**",
                    "camera": "says it came from a **camera**", "none": "says **nothing** about its origin"}


def provenance_markdown(answer: dict) -> str:
    """The file's own declarations, kept apart from the verdict: metadata can be stripped or forged."""
    block = answer.get("provenance")
    if not block:
        return ""
    lines = [f"**Provenance**: the file's metadata {PROVENANCE_WORDS[block['declared']]}. It is not part of "
             "the score: metadata can be stripped or forged, and its absence means nothing."]
    lines += [f"- {e}" for e in block["evidence"]]
    c2pa = block.get("c2pa") or {}
    if c2pa.get("present"):
        signer = ", ".join(filter(None, (c2pa.get("signer"), c2pa.get("issuer")))) or "unknown signer"
        lines.append(f"- Content Credentials (C2PA): {c2pa.get('validation_state') or 'unreadable'}, "
                     f"signed by {signer}, made with {c2pa.get('claim_generator') or 'an unnamed tool'}")
    if block.get("error"):
        lines.append(f"- Not read: {block['error']}")
    return "\n".join(lines)


def box_text(b: dict) -> str:
    """Where a region box of an explanation lies, for people (the page and `aigd explain`)."""
    return (f"x {100 * b['x']:.0f}-{100 * (b['x'] + b['w']):.0f} %, y {100 * b['y']:.0f}-{100 * (b['y'] + b['h']):.0f} %"
            " of the image")


def evidence_markdown(explanation: dict) -> str:
    boxes = explanation["region_boxes"]
    if not boxes:
        return f"**Evidence** ({explanation['method']}): no region pushes the answer towards fake."
    return (f"**Evidence** ({explanation['method']}): strongest region {box_text(boxes[0])}; {len(boxes)} region(s) "
            "outlined")


def overlay_image(answer: dict) -> Image.Image:
    """The API's overlay PNG, pixel for pixel (the page shows it as PNG)."""
    return Image.open(io.BytesIO(base64.b64decode(answer["explanation"]["overlay_png_base64"])))


def member_rows(answer: dict) -> list[list]:
    return [[name, round(m["p_fake"], 4), m["label"], round(m["threshold"], 4), _band(m),
             f"{m['model'].get('version', '')} ({m['model'].get('method', '')}, code {m['model'].get('code_version', '')})"]
            for name, m in sorted(answer["members"].items())]


MEMBER_COLUMNS = ["adapter", "P(fake)", "label", "threshold", "uncertain band", "version"]


# The copies are decoded here, in the page's process: only images the API would decode at all.
MAX_VARIANT_PIXELS = 40_000_000


def variants(data: bytes) -> list[tuple[str, bytes]]:
    img = Image.open(io.BytesIO(data))
    if img.width * img.height > MAX_VARIANT_PIXELS:
        raise ValueError(f"{img.width}x{img.height} is too large to re-encode here")
    img.load()
    img = img.convert("RGB")
    out = []
    for name, how in VARIANTS:
        if how is None:
            out.append((name, data))
            continue
        buf = io.BytesIO()
        if how == "half":
            img.resize((max(28, img.width // 2), max(28, img.height // 2)), Image.Resampling.BICUBIC).save(buf, "PNG")
        else:
            img.save(buf, format="JPEG", quality=how)
        out.append((name, buf.getvalue()))
    return out


def batch_table(names: list[str], answer: dict, members: list[str]) -> list[list]:
    rows = []
    for name, r in zip(names, answer["results"]):
        if "error" in r:
            rows.append([name, *[None] * len(members), None, "error", f"{r['status']} {r['error']['message']}"])
        else:
            per = [round(r["members"][m]["p_fake"], 4) if m in r["members"] else None for m in members]
            rows.append([name, *per, round(r["p_fake"], 4), r["label"], ""])
    return rows


def build(client: Client, members: list[str], examples: list[str] = (), per_call: int = 16,
          keep_uploads_s: int = 300):
    """The page. `per_call`: images per batch request (the API's limit); uploads and the files the page
    writes are deleted `keep_uploads_s` after they were made."""
    import gradio as gr

    def score(path, explain):
        if not path:
            return "Upload an image first.", [], None, ""
        t0 = time.perf_counter()
        try:
            call = client.explain if explain else client.score
            answer = call(Path(path).name, Path(path).read_bytes())
        except ApiError as e:
            return f"**{e}**", [], None, ""
        except FileNotFoundError:
            return GONE, [], None, ""
        if answer.get("degraded"):
            gr.Warning("Degraded answer: an ensemble member failed")
        text = verdict_markdown(answer, (time.perf_counter() - t0) * 1000)
        origin = provenance_markdown(answer)
        if not explain:
            return text, member_rows(answer), None, origin
        return (text + "  \n" + evidence_markdown(answer["explanation"]), member_rows(answer), overlay_image(answer),
                origin)

    def ask(items: list[tuple[str, bytes]]) -> dict:
        """One batch answer for any number of images, in requests of the API's size."""
        results = []
        for start in range(0, len(items), per_call):
            results += client.batch(items[start:start + per_call])["results"]
        return {"results": results}

    def stability(path):
        if not path:
            return "Upload an image first.", [], None
        try:
            items = variants(Path(path).read_bytes())
            answer = ask(items)
        except ApiError as e:
            return f"**{e}**", [], None
        except FileNotFoundError:
            return GONE, [], None
        except Exception as e:  # an image the page cannot open to re-encode
            return f"**cannot re-encode this file: {type(e).__name__}**", [], None
        rows = batch_table([n for n, _ in items], answer, members)
        labels = {r[-2] for r in rows if r[-2] != "error"}
        note = ("The verdict **holds** for every copy." if len(labels) == 1 else
                f"The verdict **flips** across copies ({', '.join(sorted(labels))}): do not trust a single answer on "
                "a re-shared image.")
        return note, rows, _stability_plot(rows)

    def batch(paths):
        """Streams: a request of `per_call` files at a time, read from disk only then, the table
        growing as answers come; the CSV last. Uploads stay to delete_cache: Gradio files them by
        content, shared by every session, so one deleted here could be another tab's."""
        if not paths:
            yield "Upload files first.", [], None
            return
        rows, folder = [], Path(tempfile.mkdtemp(prefix="aigd-ui-"))
        try:
            for start in range(0, len(paths), per_call):
                chunk = paths[start:start + per_call]
                try:
                    items = [(Path(p).name, Path(p).read_bytes()) for p in chunk]
                    answer = client.batch(items)
                except FileNotFoundError:
                    yield GONE, rows, None
                    return
                except ApiError as e:
                    yield f"**{e}** (after {len(rows)} of {len(paths)} files)", rows, None
                    return
                rows += batch_table([n for n, _ in items], answer, members)
                yield f"{len(rows)} of {len(paths)} files scored…", rows, None
            out = folder / "aigd-batch.csv"
            with out.open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(batch_columns(members))
                writer.writerows(rows)
            yield f"{len(rows)} files scored.", rows, str(out)
        finally:  # Gradio has copied the CSV into its own cache (deleted by delete_cache) before this runs
            shutil.rmtree(folder, ignore_errors=True)

    # Every upload sent as the user's bytes (image_mode=None): Gradio's default converts non-RGB files to
    # RGB and re-saves them (alpha dropped, CMYK re-encoded, EXIF rotation applied) before the API sees them.
    with gr.Blocks(title="aigd: real photo or AI-generated?", delete_cache=(60, keep_uploads_s)) as demo:
        gr.Markdown(f"# Real photo or AI-generated?\nAnswers from the detector API at `{client.api}`. Uploads and "
                    f"results are deleted within {keep_uploads_s // 60 + 1} minutes.")
        with gr.Tab("Score"):
            image = gr.Image(type="filepath", image_mode=None, label="Image (upload, paste or drop)",
                             sources=["upload", "clipboard"], elem_id="score-image")
            if examples:
                gr.Examples(examples=[[e] for e in examples], inputs=image, label="Held-out samples (the file name "
                            "says the truth)", elem_id="score-examples")
            explain = gr.Checkbox(label="Show where the evidence is (slower: several passes of the model)",
                                  elem_id="score-explain")
            go = gr.Button("Score", variant="primary", elem_id="score-button")
            with gr.Row():
                verdict = gr.Markdown(elem_id="score-verdict")
                overlay = gr.Image(type="pil", format="png", label="Where the evidence for fake is (the "
                                   "model's view; brighter = more)", interactive=False, elem_id="score-overlay")
            table = gr.Dataframe(headers=MEMBER_COLUMNS, label="Per adapter", elem_id="score-members")
            origin = gr.Markdown(elem_id="score-provenance")
            go.click(score, [image, explain], [verdict, table, overlay, origin], concurrency_limit=8)
        with gr.Tab("Stability"):
            s_image = gr.Image(type="filepath", image_mode=None, label="Image", sources=["upload", "clipboard"],
                               elem_id="stab-image")
            s_go = gr.Button("Score the re-compressed copies", variant="primary", elem_id="stab-button")
            s_note = gr.Markdown(elem_id="stab-note")
            s_table = gr.Dataframe(headers=batch_columns(members, first="copy"), label="Copies", elem_id="stab-table")
            s_plot = gr.BarPlot(x="copy", y="P(fake)", color="label", y_lim=[0, 1], sort=[n for n, _ in VARIANTS],
                                label="Ensemble P(fake) per copy")
            s_go.click(stability, s_image, [s_note, s_table, s_plot], concurrency_limit=4)
        with gr.Tab("Batch"):
            files = gr.File(file_count="multiple", label="Images", elem_id="batch-files")
            b_go = gr.Button("Score all", variant="primary", elem_id="batch-button")
            b_note = gr.Markdown(elem_id="batch-note")
            b_table = gr.Dataframe(headers=batch_columns(members), label="Results", elem_id="batch-table")
            b_csv = gr.File(label="CSV", elem_id="batch-csv")
            # Two batches at once at most: a 500-file batch never holds up the Score tab (its own limit).
            b_go.click(batch, files, [b_note, b_table, b_csv], concurrency_limit=2)
    return demo


def batch_columns(members: list[str], first: str = "file") -> list[str]:
    return [first, *[f"P(fake) {m}" for m in members], "P(fake) ensemble", "label", "error"]


def _stability_plot(rows: list[list]):
    import pandas as pd

    ok = [r for r in rows if r[-2] != "error"]
    return pd.DataFrame({"copy": [r[0] for r in ok], "P(fake)": [r[-3] for r in ok], "label": [r[-2] for r in ok]})


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_exposure(host: str, api_key: str | None, auth: tuple[str, str] | None) -> None:
    """A page that holds an API key is that key for whoever reaches it: beyond loopback, only with a login."""
    if host not in LOOPBACK and api_key and not auth:
        raise SystemExit(f"refusing to serve on {host}: this page holds an API key, so anyone who can reach it "
                         "could use the API; set a login for the page (--auth-env, 'user:password') or bind to "
                         "127.0.0.1")


def serve_ui(api: str, host: str = "127.0.0.1", port: int = 7860, api_key_env: str = API_KEY_ENV,
             block: bool = True, examples_dir: str | None = None, auth_env: str = "AIGD_UI_AUTH",
             max_file_mb: int = 20):
    """Start the page; its members are the API's ensemble members (asked once, from /v1/models)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    auth = tuple(os.environ[auth_env].split(":", 1)) if ":" in os.environ.get(auth_env, "") else None
    check_exposure(host, os.environ.get(api_key_env), auth)
    client = Client(api, os.environ.get(api_key_env))
    try:
        members = list(client.models()["ensemble"]["members"])
        per_call = client.max_batch_images()
    except (ApiError, KeyError, TypeError) as e:
        raise SystemExit(f"the API at {api} did not describe its models ({e}); start it "
                         "first (make serve-demo)") from None
    examples = sorted(str(p) for p in Path(examples_dir).glob("*") if p.is_file()) if examples_dir else []
    demo = build(client, members, examples, per_call)
    demo.queue(default_concurrency_limit=4)
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, share=False, show_error=False,
                auth=auth, max_file_size=f"{max_file_mb}mb")
    return demo


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="the aigd web page, a client of the detector API")
    ap.add_argument("--api", default="http://127.0.0.1:8000", help="the detector API's base URL")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (loopback unless you mean to share it)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--api-key-env", default=API_KEY_ENV, help="env var holding the API key, if the API wants one")
    ap.add_argument("--auth-env", default="AIGD_UI_AUTH", help="env var holding the page's own login, user:password "
                                                               "(required beyond loopback when an API key is set)")
    ap.add_argument("--examples", help="a folder of images offered as clickable examples (make ui: the demo's "
                                       "held-out samples)")
    ap.add_argument("--max-file-mb", type=int, default=20, help="largest upload accepted, in MB")
    args = ap.parse_args(argv)
    serve_ui(args.api, args.host, args.port, args.api_key_env, examples_dir=args.examples, auth_env=args.auth_env,
             max_file_mb=args.max_file_mb)


if __name__ == "__main__":
    main()
