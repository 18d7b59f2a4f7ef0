"""The serving peer: what a team that skips Ray writes, one FastAPI + uvicorn process around the same
Scorer (the project's decode, model, adapters and answers), no batching, no router.

    python bench/peer_server.py --port 8123          # (bench/peers.py starts and stops it)

Endpoints as the Serve app's: POST /v1/detect?adapter=NAME and /v1/ensemble with a multipart `image`,
GET /readyz. The endpoints are plain `def`s: FastAPI runs them in its thread pool, and the Scorer's
lock lets one forward run at a time, as one process holding one model does.
"""


import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]


def make_app(args: dict):
    from fastapi import FastAPI, File, Query, UploadFile
    from fastapi.responses import JSONResponse

    from aigd import config as C
    from aigd.errors import AigdError, error_body, http_status
    from aigd.scorer import Scorer

    cfg = C.from_dict(C.ServeConfig, args)
    scorer = Scorer(cfg, warm_up=True)
    api = FastAPI()

    @api.exception_handler(AigdError)
    def _error(_, exc: AigdError):
        return JSONResponse(error_body(exc), status_code=http_status(exc))

    @api.get("/readyz")
    def readyz():
        return {"ready": True, "adapters": sorted(scorer.members)}

    @api.post("/v1/detect")
    def detect(image: UploadFile = File(...), adapter: str = Query(...)):
        pixels = scorer.prepare(image.file.read(), cfg.limits)
        p, member = scorer.member_p_fake([pixels], adapter)
        return scorer.answer(member, float(p[0]))

    @api.post("/v1/ensemble")
    def ensemble(image: UploadFile = File(...)):
        return scorer.answers([scorer.prepare(image.file.read(), cfg.limits)], cfg.ensemble)[0]

    return api


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args(argv)
    import torch
    import uvicorn

    from serve_load import demo_args

    torch.set_num_threads(os.cpu_count())  # the one process has the machine
    uvicorn.run(make_app(demo_args()), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
