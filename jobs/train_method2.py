"""Method 2, the low-quality specialist: LoRA with fresh augmentation + JPEG simulation every epoch,
focal loss (alpha 0.75 on Fake, gamma 2.0) on the Real/Fake decision, cosine schedule, 2 epochs.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train_method2.py --config configs/demo_method2.yaml
    python jobs/train_method2.py --config configs/method2.yaml optim.lr=5e-5   # local Ray

Same steps as Method 1 (`aigd.train.run`); what differs is the PRESET below.
"""

from __future__ import annotations

from aigd import train as T
from aigd.registry import Version

METHOD = "method2"
# What makes this Method 2; a config may still override any of it (the manifest records what ran).
PRESET = {
    "optim": {"loss": "focal", "focal_alpha": 0.75, "focal_gamma": 2.0, "scheduler": "cosine", "lr": 5e-5,
              "epochs": 2},
    "augment": {"enabled": True, "crop_size": 512, "jpeg_quality": [50, 95]},
    "run": {"name": METHOD, "export_dir": "${AIGD_HOME:-~/.cache/aigd}/adapters/method2"},
}


def main(argv=None, hooks=()) -> Version:
    return T.run(METHOD, PRESET, __doc__.splitlines()[0], argv, hooks)


if __name__ == "__main__":
    main()
