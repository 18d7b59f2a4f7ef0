"""`aigd adapters list|migrate|shadow-report`, `aigd promote`, `aigd rollback`, `aigd shadow`: the
command-line side of aigd.lifecycle."""

from __future__ import annotations

import json
import sys

import requests

from aigd import config as C

EXAMPLES = {
    "adapters": ["aigd adapters list", "aigd adapters list --root s3://bucket/aigd/adapters --app http://127.0.0.1:8000",
                 "aigd adapters migrate .aigd/adapters/method2",
                 "aigd adapters shadow-report --metrics http://127.0.0.1:8080/metrics"],
    "promote": ["aigd promote method2 20261201T101500123Z-1a2b3c4d --app http://127.0.0.1:8000",
                "aigd promote method2 VERSION --app URL --config configs/promote_demo.yaml gate.max_regression=0.02",
                "aigd promote method2 VERSION --app https://aigd.example.com --rayservice deploy/kuberay/rayservice.yaml"],
    "rollback": ["aigd rollback method2 --app http://127.0.0.1:8000",
                 "aigd rollback method2 --app https://aigd.example.com --rayservice deploy/kuberay/rayservice.yaml"],
    "shadow": ["aigd shadow method2 20261201T101500123Z-1a2b3c4d --share 0.25 --app http://127.0.0.1:8000",
               "aigd shadow method2 --off --app http://127.0.0.1:8000"],
}

PROMOTE_HELP = """Switch one adapter of a running app to another registry version, in place: every answer
comes wholly from one version and names it, no request fails. Refused (exit 2, nothing changes) unless
the candidate is intact, was trained on the serving base with the same image policy, and passes the
gate against the serving version on an evaluation set both were evaluated on (jobs/evaluate.py)."""


def _config(args) -> C.PromoteConfig:
    if args.config:
        return C.load(C.PromoteConfig, args.config, args.overrides)
    return C.from_dict(C.PromoteConfig, dict(_overrides(args.overrides)))


def _overrides(items: list[str]) -> dict:
    raw: dict = {}
    for key, value in C.parse_overrides(items):
        C._set_dotted(raw, key, value)
    return raw


def _common(p, rayservice: bool = False) -> None:
    p.add_argument("--app", required=True, metavar="URL", help="the app's HTTP address, e.g. http://127.0.0.1:8000")
    if rayservice:
        p.add_argument("--rayservice", metavar="FILE", help="write the switch into this RayService manifest (then "
                       "kubectl apply it) instead of changing the app through the Ray dashboard")
    p.add_argument("--config", default=None, help="a PromoteConfig YAML (registry, dashboard, gate)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. registry=s3://bucket/adapters")


def _list(args) -> None:
    from aigd.lifecycle import listing

    cfg = _config(args)
    rows = listing(args.root or cfg.registry, args.app or [], cfg.dashboard, cfg.serve_app,
                   warn=lambda m: print(m, file=sys.stderr))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'name':10s} {'version':29s} {'created':25s} {'method':8s} {'base':16s} {'clean AUC':>9s} "
          f"{'q50 AUC':>8s} {'coverage':>8s}  serving")
    for r in rows:
        f = (lambda v: "-" if v is None else f"{v:.4f}")
        print(f"{r['name']:10s} {r['version']:29s} {r['created'] or '-':25s} {r['method'] or '-':8s} "
              f"{r['base'] or '-':16s} {f(r['clean_auc']):>9s} {f(r['jpeg_q50_auc']):>8s} {f(r['coverage']):>8s}  "
              f"{', '.join(r['serving']) or '-'}")


def _migrate(args) -> None:
    from aigd import registry
    from aigd.manifest import upgrade

    v = registry.migrate(args.folder, upgrade)
    print(f"published {v} at {v.uri}; the old files are in {args.folder.rstrip('/')}/_unversioned/")


def _shadow_report(args) -> None:
    from aigd.lifecycle import shadow_report

    rows = shadow_report(requests.get(args.metrics, timeout=30).text)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print("no shadow scoring recorded at", args.metrics)
    for r in rows:
        if not r["candidate"]:
            print(f"{r['adapter']}: {r['skipped']:.0f} sampled images skipped (shadow busy)")
            continue
        agree = "-" if r["agreement"] is None else f"{r['agreement']:.1%}"
        diff = "-" if r["mean_abs_diff"] is None else f"{r['mean_abs_diff']:.4f}"
        print(f"{r['adapter']}: candidate {r['candidate']} vs serving {r['serving']}: {r['images']:.0f} images, "
              f"agreement {agree}, mean |dP(fake)| {diff}, label flips {r['flips'] or 0}")


def _promote(args) -> None:
    from aigd.lifecycle import promote

    promote(_config(args), args.name, args.version, args.app, evalset=args.evaluation_set,
            rayservice=args.rayservice)


def _rollback(args) -> None:
    from aigd.lifecycle import rollback

    rollback(_config(args), args.name, args.app, rayservice=args.rayservice)


def _shadow(args) -> None:
    from aigd.errors import BadRequest
    from aigd.lifecycle import set_shadow

    if (args.version is None) == (not args.off):
        raise BadRequest("name a VERSION to shadow, or --off to end the shadow")
    set_shadow(_config(args), args.name, None if args.off else args.version, args.share, args.app, args.budget_ms)


def add_commands(sub, subcommand) -> None:
    """Register the lifecycle commands; `subcommand(sub, name, fn, summary, description)` makes each."""
    a = subcommand(sub, "adapters", None, "the adapter registry: list versions, migrate, shadow report")
    asub = a.add_subparsers(dest="what", required=True)
    ls = asub.add_parser("list", help="every version: identity, recorded figures, which app serves it")
    ls.set_defaults(fn=_list)
    ls.add_argument("--root", default=None, help="registry root (default: the config's registry)")
    ls.add_argument("--app", action="append", metavar="URL", help="a running app to ask what it serves (repeat)")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--config", default=None)
    ls.add_argument("overrides", nargs="*")
    mg = asub.add_parser("migrate", help="publish an unversioned adapter folder as its first version")
    mg.set_defaults(fn=_migrate)
    mg.add_argument("folder")
    sr = asub.add_parser("shadow-report", help="how shadow versions agree with the serving ones (Prometheus)")
    sr.set_defaults(fn=_shadow_report)
    sr.add_argument("--metrics", default="http://127.0.0.1:8080/metrics", help="Ray's Prometheus endpoint")
    sr.add_argument("--json", action="store_true")

    p = subcommand(sub, "promote", _promote, "gate a version, then switch a running app to it in place", PROMOTE_HELP)
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("--evaluation-set", default=None, help="compare on this evaluation set (default: the newest shared)")
    _common(p, rayservice=True)
    r = subcommand(sub, "rollback", _rollback, "switch back to the version the last promotion replaced")
    r.add_argument("name")
    _common(r, rayservice=True)
    s = subcommand(sub, "shadow", _shadow, "score a share of live images also with a candidate version")
    s.add_argument("name")
    s.add_argument("version", nargs="?")
    s.add_argument("--share", type=float, default=0.1, help="fraction of the adapter's images scored in shadow")
    s.add_argument("--budget-ms", type=float, default=50.0,
                   help="the most a live batch may wait behind shadow work on a replica")
    s.add_argument("--off", action="store_true", help="end the shadow")
    _common(s)
