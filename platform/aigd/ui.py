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
    degraded = (f"  \n**Degraded**: answered without {', '.join(answer['members_failed'])}"
                if answer.get("degraded") else "")
    return (f"## Verdict: **{answer['label'].upper()}**\n"
            f"Ensemble P(fake) **{answer['p_fake']:.3f}** · threshold {answer['threshold']:.3f} · "
            f"uncertain band {_band(answer)} · members {', '.join(answer['members_used'])}{degraded}  \n"
            f"Latency {latency_ms:.0f} ms round trip (model {answer['timing']['model_ms']:.0f} ms, "
            f"decode {answer['timing']['decode_ms']:.0f} ms)")


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


def overlay_file(answer: dict) -> str:
    """The API's overlay PNG, byte for byte, as a file the page shows."""
    out = Path(tempfile.mkdtemp(prefix="aigd-ui-")) / "evidence.png"
    out.write_bytes(base64.b64decode(answer["explanation"]["overlay_png_base64"]))
    return str(out)


def member_rows(answer: dict) -> list[list]:
    return [[name, round(m["p_fake"], 4), m["label"], round(m["threshold"], 4), _band(m),
             f"{m['model'].get('version', '')} ({m['model'].get('method', '')}, code {m['model'].get('code_version', '')})"]
            for name, m in sorted(answer["members"].items())]


MEMBER_COLUMNS = ["adapter", "P(fake)", "label", "threshold", "uncertain band", "version"]


def variants(data: bytes) -> list[tuple[str, bytes]]:
    img = Image.open(io.BytesIO(data))
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


def build(client: Client, members: list[str]):
    import gradio as gr

    def score(path, explain):
        if not path:
            return "Upload an image first.", [], None
        t0 = time.perf_counter()
        try:
            call = client.explain if explain else client.score
            answer = call(Path(path).name, Path(path).read_bytes())
        except ApiError as e:
            return f"**{e}**", [], None
        text = verdict_markdown(answer, (time.perf_counter() - t0) * 1000)
        if not explain:
            return text, member_rows(answer), None
        return text + "  \n" + evidence_markdown(answer["explanation"]), member_rows(answer), overlay_file(answer)

    def stability(path):
        if not path:
            return "Upload an image first.", [], None
        try:
            items = variants(Path(path).read_bytes())
            answer = client.batch(items)
        except ApiError as e:
            return f"**{e}**", [], None
        except Exception as e:  # an image the client itself cannot open to re-encode
            return f"**cannot re-encode this file: {type(e).__name__}**", [], None
        rows = batch_table([n for n, _ in items], answer, members)
        labels = {r[-2] for r in rows if r[-2] != "error"}
        note = ("The verdict **holds** for every copy." if len(labels) == 1 else
                f"The verdict **flips** across copies ({', '.join(sorted(labels))}): do not trust a single answer on "
                "a re-shared image.")
        return note, rows, _stability_plot(rows)

    def batch(paths):
        if not paths:
            return "Upload files first.", [], None
        files = [(Path(p).name, Path(p).read_bytes()) for p in paths]
        rows = []
        try:
            for i in range(0, len(files), 16):  # the API's default max_batch_images
                chunk = files[i:i + 16]
                rows += batch_table([n for n, _ in chunk], client.batch(chunk), members)
        except ApiError as e:
            return f"**{e}**", rows, None
        out = Path(tempfile.mkdtemp(prefix="aigd-ui-")) / "aigd-batch.csv"
        with out.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(batch_columns(members))
            writer.writerows(rows)
        return f"{len(rows)} files scored.", rows, str(out)

    with gr.Blocks(title="aigd: real photo or AI-generated?") as demo:
        gr.Markdown(f"# Real photo or AI-generated?\nAnswers from the detector API at `{client.api}`.")
        with gr.Tab("Score"):
            image = gr.Image(type="filepath", label="Image (upload, paste or drop)", sources=["upload", "clipboard"],
                             elem_id="score-image")
            explain = gr.Checkbox(label="Show where the evidence is (slower: several passes of the model)",
                                  elem_id="score-explain")
            go = gr.Button("Score", variant="primary", elem_id="score-button")
            with gr.Row():
                verdict = gr.Markdown(elem_id="score-verdict")
                overlay = gr.Image(type="filepath", format="png", label="Where the evidence for fake is (the "
                                   "model's view; brighter = more)", interactive=False, elem_id="score-overlay")
            table = gr.Dataframe(headers=MEMBER_COLUMNS, label="Per adapter", elem_id="score-members")
            go.click(score, [image, explain], [verdict, table, overlay])
        with gr.Tab("Stability"):
            s_image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"], elem_id="stab-image")
            s_go = gr.Button("Score the re-compressed copies", variant="primary", elem_id="stab-button")
            s_note = gr.Markdown(elem_id="stab-note")
            s_table = gr.Dataframe(headers=batch_columns(members, first="copy"), label="Copies", elem_id="stab-table")
            s_plot = gr.BarPlot(x="copy", y="P(fake)", color="label", y_lim=[0, 1], sort=[n for n, _ in VARIANTS],
                                label="Ensemble P(fake) per copy")
            s_go.click(stability, s_image, [s_note, s_table, s_plot])
        with gr.Tab("Batch"):
            files = gr.File(file_count="multiple", label="Images", elem_id="batch-files")
            b_go = gr.Button("Score all", variant="primary", elem_id="batch-button")
            b_note = gr.Markdown(elem_id="batch-note")
            b_table = gr.Dataframe(headers=batch_columns(members), label="Results", elem_id="batch-table")
            b_csv = gr.File(label="CSV", elem_id="batch-csv")
            b_go.click(batch, files, [b_note, b_table, b_csv])
    return demo


def batch_columns(members: list[str], first: str = "file") -> list[str]:
    return [first, *[f"P(fake) {m}" for m in members], "P(fake) ensemble", "label", "error"]


def _stability_plot(rows: list[list]):
    import pandas as pd

    ok = [r for r in rows if r[-2] != "error"]
    return pd.DataFrame({"copy": [r[0] for r in ok], "P(fake)": [r[-3] for r in ok], "label": [r[-2] for r in ok]})


def serve_ui(api: str, host: str = "127.0.0.1", port: int = 7860, api_key_env: str = API_KEY_ENV,
             block: bool = True):
    """Start the page; its members are the API's ensemble members (asked once, from /v1/models)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    client = Client(api, os.environ.get(api_key_env))
    try:
        members = list(client.models()["ensemble"]["members"])
    except (ApiError, KeyError, TypeError) as e:
        raise SystemExit(f"the API at {api} did not describe its models ({e}); start it "
                         "first (make serve-demo)") from None
    demo = build(client, members)
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, share=False, show_error=False)
    return demo


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="the aigd web page, a client of the detector API")
    ap.add_argument("--api", default="http://127.0.0.1:8000", help="the detector API's base URL")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (loopback unless you mean to share it)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--api-key-env", default=API_KEY_ENV, help="env var holding the API key, if the API wants one")
    args = ap.parse_args(argv)
    serve_ui(args.api, args.host, args.port, args.api_key_env)


if __name__ == "__main__":
    main()
