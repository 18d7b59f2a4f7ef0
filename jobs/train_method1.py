"""Method 1, the high-quality specialist: LoRA, cross-entropy on the answer token only, linear
schedule, 1 epoch, on balanced clean data (deterministic resize to the shared pixel budget).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train_method1.py --config configs/demo_method1.yaml
    python jobs/train_method1.py --config configs/method1.yaml optim.lr=1e-4   # local Ray

`aigd.train.run` does it in order: config (this PRESET <- the YAML <- a.b=c overrides) -> data plan
(one metadata pass) -> Ray Train (the loop in aigd.loop on every worker: model, loss, validation,
checkpoints) -> export (calibrated on the val split, adapter + manifest).
"""

from __future__ import annotations

from aigd import train as T
from aigd.registry import Version

METHOD = "method1"
# What makes this Method 1; a config may still override any of it (the manifest records what ran).
PRESET = {
    "optim": {"loss": "ce", "scheduler": "linear", "lr": 1e-4, "epochs": 1},
    "augment": {"enabled": False},
    "run": {"name": METHOD, "export_dir": "${AIGD_HOME:-~/.cache/aigd}/adapters/method1"},
}


def main(argv=None, hooks=()) -> Version:
    return T.run(METHOD, PRESET, __doc__.splitlines()[0], argv, hooks)


if __name__ == "__main__":
    main()
