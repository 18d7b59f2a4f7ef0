"""Typed, frozen job configs loaded from YAML, validated on load, with `a.b=c` overrides.

Every YAML under configs/ maps 1:1 onto one of the top-level dataclasses at the bottom of this
file. Unknown keys and wrong types are errors that name the dotted key, so a typo in a config
fails at submit time instead of silently training with a default.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A config file or override that does not match its dataclass."""


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class ModelConfig:
    # Hub id or local folder. `build_tiny` makes the offline tiny Qwen2.5-VL there if it is missing.
    name_or_path: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    revision: Optional[str] = None  # hub branch, tag or commit of name_or_path; None: main
    # unsloth: Unsloth on CUDA; hf: transformers + peft, any device; auto: unsloth where CUDA and the unsloth
    # package both exist, else hf.
    backend: Literal["auto", "unsloth", "hf"] = "auto"
    load_in_4bit: bool = True  # NF4 4-bit base weights on CUDA (bitsandbytes or Unsloth); ignored on CPU
    # Weight and compute dtype; auto: bfloat16 on CUDA (float16 where bf16 is unsupported), float32 on CPU.
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    gradient_checkpointing: bool = True  # training: recompute activations in backward (less memory, slower)
    # Attention kernel; auto: flash_attention_2 where CUDA and the flash-attn package exist, else sdpa.
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = "auto"
    build_tiny: bool = False  # dev only: build the random-weight tiny Qwen2.5-VL at name_or_path if missing


@dataclass(frozen=True)
class LoraConfig:
    r: int = 16  # LoRA rank: the inner dimension of each low-rank update
    alpha: int = 16  # LoRA scale numerator: updates are scaled by alpha / r
    dropout: float = 0.0  # dropout on each LoRA layer's input while training (0: none)
    vision: bool = True  # adapt the vision tower's blocks (visual.blocks.*)
    language: bool = True  # adapt the language model's layers (language_model.layers.*)
    attention: bool = True  # in the chosen towers: the attention projections (vision qkv/proj, language q/k/v/o)
    mlp: bool = True  # in the chosen towers: the MLP projections (gate/up/down)
    # Also the vision patch embedding, the only layer that sees pixels. The demo's random-weight tiny
    # base needs it to learn generator traces (its frozen patch embedding is a random projection);
    # off by default: the seed's targets, and a pretrained 7B's patch embedding already sees them.
    patch_embed: bool = False
    seed: int = 3407  # seed of the LoRA weights' random initialization


@dataclass(frozen=True)
class ImagePolicy:
    """How an image becomes pixels for the model: shared by training, evaluation and serving."""

    max_pixels: int = 512 * 512  # largest area in pixels the model sees; larger images are resized down
    min_pixels: int = 56 * 56  # smallest area in pixels the model sees; smaller images are resized up
    prompt: str = "Real/Fake?"  # the text asked with every image; the answer is the token Real or Fake
    prompt_version: str = "v1"  # the prompt's label in manifests; a scorer refuses an adapter with another


@dataclass(frozen=True)
class DataConfig:
    # sid_parquet: parquet shards (SID_Set's columns); hf_disk: a `save_to_disk` folder; image_folder: class
    # folders (aigd.sources.FOLDER_LAYOUTS); hub: a hub dataset's parquet files, downloaded once.
    source: Literal["sid_parquet", "hf_disk", "image_folder", "hub"] = "sid_parquet"
    path: str = "saberzl/SID_Set"  # the source's folder, file or s3:// / gs:// URI; for hub, the dataset id
    # dataset label -> class name; names other than real/fake/tampered are errors.
    label_map: dict[int, str] = field(default_factory=lambda: {0: "real", 1: "fake", 2: "tampered"})
    tampered: Literal["drop", "fake"] = "drop"  # rows labelled tampered: dropped, or counted as fake
    min_width: int = 1024  # rows narrower than this (pixels, from metadata) are dropped from every split
    min_height: int = 0  # rows shorter than this (pixels) are dropped; 0: no limit
    val_fraction: float = 0.15  # share of rows (or split_group_sep groups) hashed into the val split
    test_fraction: float = 0.15  # share hashed into the test split; train gets the rest
    split_salt: str = "aigd-split-v1"  # salt of the img_id hash that splits rows; another salt, other splits
    # Hash only the part of img_id before this separator, so related rows share a split.
    split_group_sep: Optional[str] = None
    # Rows whose metadata column holds a listed value are dropped from every split, e.g.
    # {generator: [vae]}: a leave-one-generator-out training run (evaluation keeps them).
    exclude: dict[str, list[str]] = field(default_factory=dict)
    balance: bool = True  # undersample the larger class of the train split to the smaller, redrawn each epoch
    seed: int = 3407  # seed of the balance draw, the val subset and every augmentation draw
    # Decode cap in pixels for dataset images (training, evaluation); larger ones are skipped and counted.
    max_image_pixels: int = 40_000_000
    max_rows: Optional[int] = None  # read only the source's first N rows, before any filter; None: all
    preprocess_cpus: float = 1.0  # CPUs each preprocessing actor reserves
    # Preprocessing actors per epoch (each reads, decodes, augments and encodes its rows; each holds
    # preprocess_cpus). None: as many as the CPUs left after the training workers hold, at most 4 per
    # training worker.
    preprocess_actors: Optional[int] = None
    preserve_order: bool = False  # Ray Data keeps rows in input order: reproducible batches, less throughput
    # Without augmentation (Method 1) every epoch would decode and encode the same images again:
    # preprocess the train split once and keep it in the object store (spilled to disk when full;
    # ~0.8 MB per 512-px image), and draw each epoch's balanced sample from it.
    cache_preprocessed: bool = False
    # Cap on Ray Data's object-store buffering between stages (None: Ray's default, a share of the
    # node's object store). Preprocessed patches are ~1.5 MB per 512-px image.
    object_store_budget_mb: Optional[int] = None


@dataclass(frozen=True)
class AugmentConfig:
    # Method 2: train images get a random resized crop, flip, colour jitter and JPEG re-encode, redrawn each
    # epoch (val and test never). Requires data.cache_preprocessed off.
    enabled: bool = False
    hflip_p: float = 0.5  # probability of a horizontal flip
    # ColorJitter: brightness, contrast, saturation factors drawn in [1-x, 1+x]; hue shift in [-x, x] of the wheel.
    color_jitter: tuple[float, float, float, float] = (0.2, 0.2, 0.2, 0.02)
    crop_size: int = 512  # side in pixels of the square the random crop is resized to
    crop_scale: tuple[float, float] = (0.4, 1.0)  # (min, max) share of the image's area the crop covers
    crop_ratio: tuple[float, float] = (0.8, 1.25)  # (min, max) width/height of the crop before the resize
    jpeg_p: float = 1.0  # probability of a JPEG re-encode after the crop (compression simulation)
    jpeg_quality: tuple[int, int] = (50, 95)  # JPEG quality drawn uniformly from [min, max], both included


@dataclass(frozen=True)
class OptimConfig:
    # ce: cross-entropy of the answer token over the whole vocabulary (Method 1); focal: binary focal loss
    # on the Real/Fake logits (Method 2). See aigd.losses.LOSSES.
    loss: Literal["ce", "focal"] = "ce"
    focal_alpha: float = 0.75  # focal loss only: weight of the Fake class (Real gets 1 - alpha)
    focal_gamma: float = 2.0  # focal loss only: focusing exponent on (1 - p_true); 0: weighted cross-entropy
    lr: float = 1e-4  # AdamW peak learning rate, reached after warmup
    scheduler: Literal["linear", "cosine", "constant"] = "linear"  # after warmup: linear/cosine decay to 0, or flat
    warmup_ratio: float = 0.1  # share of the total optimizer steps spent ramping the learning rate up from 0
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    epochs: int = 1  # passes over the (balanced) train split
    batch_size: int = 8  # images per micro-batch on each worker
    # Micro-batches per optimizer step; images per step = batch_size x grad_accum x scaling.num_workers.
    grad_accum: int = 5
    grad_clip: float = 1.0  # max L2 norm of the LoRA gradients per optimizer step
    # Optimizer steps the run and its schedule span (training still ends after `epochs`); None: epochs x steps
    # per epoch.
    max_steps: Optional[int] = None
    # In-loop validation: a fixed, class-stratified subset of the val split (None: all of it),
    # sharded across ranks, every `eval_every_samples` training samples and at each epoch end.
    # The exported calibration is fitted on the whole val split once, after training.
    eval_samples: Optional[int] = 2000
    eval_every_samples: int = 20_000  # validate every this many training samples (all workers together)
    early_stop_patience: Optional[int] = None  # evaluations without a better val AUC; None: never stop early
    log_every: int = 10  # a progress line (loss, lr, samples/s, ETA) every this many optimizer steps
    seed: int = 3407  # seed of Python's, numpy's and torch's generators on every worker


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: int = 1  # Ray Train workers (data-parallel ranks), each with its own copy of the model
    use_gpu: bool = True  # workers train on CUDA, each holding gpus_per_worker GPUs; false: on CPU
    cpus_per_worker: float = 4.0  # CPUs each worker reserves (on CPU also its torch threads, rounded up)
    gpus_per_worker: float = 1.0  # GPUs each worker reserves when use_gpu; below 1, ranks share a GPU
    # torch.distributed backend. auto: "cpu:gloo,cuda:nccl" on GPUs (the loop's own collectives use CPU
    # tensors, which go through gloo), gloo on CPUs and where ranks share a GPU (gpus_per_worker below 1: NCCL
    # refuses two ranks on one device). NCCL alone is not offered: it refuses CPU tensors.
    backend: Literal["auto", "gloo", "cpu:gloo,cuda:nccl"] = "auto"


@dataclass(frozen=True)
class RunConfig:
    name: str = "method1"  # the run's name: its checkpoint folder under storage_path, its log prefix
    # Where Ray Train writes checkpoints. A cluster of more than one node needs storage every node reaches:
    # s3://, gs://, or a shared mount declared with shared_storage: true. AIGD_STORAGE names it for all configs.
    storage_path: str = "${AIGD_STORAGE:-${AIGD_HOME:-~/.cache/aigd}/runs}"
    shared_storage: bool = False  # storage_path is a local path mounted on every node (NFS, Lustre)
    export_dir: str = "${AIGD_HOME:-~/.cache/aigd}/adapters/method1"  # registry entry: each export adds a <version>/
    num_to_keep: int = 2  # newest checkpoints kept (each carries the best weights so far)
    max_failures: int = 1  # restarts from the latest checkpoint after a worker failure before the run fails
    # Console level of Ray Train's own `ray.train` logs. At INFO it prints every report's whole metrics
    # dict once per rank and every checkpoint's path; the loop prints one line per evaluation, and
    # Ray Train's session log files keep every level either way.
    train_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"


@dataclass(frozen=True)
class TrainJobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # the base model the LoRA adapter is trained on
    lora: LoraConfig = field(default_factory=LoraConfig)  # which modules get LoRA, and its shape
    image: ImagePolicy = field(default_factory=ImagePolicy)  # Recorded in the manifest; scoring uses the same.
    data: DataConfig = field(default_factory=DataConfig)  # where images come from, which rows, which split
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # train-split augmentation (Method 2)
    optim: OptimConfig = field(default_factory=OptimConfig)  # loss, optimizer, schedule, batches, validation
    scaling: ScalingConfig = field(default_factory=ScalingConfig)  # Ray Train workers and what each holds
    run: RunConfig = field(default_factory=RunConfig)  # run name, checkpoints, where the adapter goes

    def validate(self) -> None:
        if self.data.cache_preprocessed and self.augment.enabled:
            raise ConfigError("data.cache_preprocessed would repeat one augmentation every epoch; it is for runs "
                              "without augmentation (Method 1)")


@dataclass(frozen=True)
class AutoscalingConfig:
    min_replicas: int = 1  # fewest replicas Serve keeps running
    max_replicas: int = 1  # most replicas Serve scales up to
    target_ongoing_requests: float = 4.0  # Serve adds replicas while each averages more requests than this


@dataclass(frozen=True)
class DetectorDeploymentConfig:
    """The replica that holds ONE base model with every adapter."""

    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)  # Serve autoscaling of the model replicas
    num_cpus: float = 1.0  # CPUs each model replica reserves
    num_gpus: float = 0.0  # GPUs each model replica reserves; 0: the model runs on CPU
    max_batch_size: int = 8  # images per forward; 1 turns batching off
    # seconds an idle model waits for more requests to join the first (serve.batcher); under load a batch
    # is everything that queued during the forward before, up to max_batch_size, with no wait
    batch_wait_timeout_s: float = 0.01
    max_ongoing_requests: int = 16  # Serve's cap on requests in flight on one model replica
    max_queued_requests: int = 64  # requests queued for the model replicas; past it, 503 + Retry-After at once
    # An adapter that fails to load: fail, the replica does not start; skip, it starts without it (see /readyz).
    on_adapter_error: Literal["fail", "skip"] = "fail"


@dataclass(frozen=True)
class RouterDeploymentConfig:
    # Serve autoscaling of the router replicas.
    autoscaling: AutoscalingConfig = field(default_factory=lambda: AutoscalingConfig(1, 2, 8.0))
    num_cpus: float = 0.1  # CPUs each router replica reserves
    # Requests one router replica scores at a time (counted once their body is in); the next ones
    # get a JSON 503 + Retry-After at once.
    max_in_flight: int = 64
    # Images one router replica decodes at once (worker threads): bounds decode memory and CPU.
    decode_concurrency: int = 2
    # Serve's own cap on requests in flight on one router replica: above ours, as a last resort (Serve answers
    # past it with a plain-text 503).
    max_ongoing_requests: int = 256
    max_queued_requests: int = 256  # Serve's own cap on requests queued for the router at each proxy (503)


@dataclass(frozen=True)
class EnsembleConfig:
    members: list[str] = field(default_factory=list)  # adapters the ensemble combines; empty: every one
    weights: dict[str, float] = field(default_factory=dict)  # name -> weight in the mean of P(fake); missing: 1
    # The ensemble's decision threshold on P(fake); None: the same weighted mean of the members' thresholds.
    threshold: Optional[float] = None
    # A member that is not loaded or fails: answer 503, or answer from the others with degraded=true.
    on_member_failure: Literal["fail", "degrade"] = "fail"


@dataclass(frozen=True)
class DecodeLimits:
    """What an image may be before it is decoded; checked on the header and the file's structure
    (aigd.images). The pixel caps are about decode memory: a JPEG decodes at a reduced DCT scale
    (1/2..1/8) near the model's size, any other format at full size first."""

    max_pixels: int = 4096 * 4096  # width x height cap of PNG, WebP, GIF, BMP: ~64 MB decoded at RGBA
    max_jpeg_pixels: int = 8192 * 8192  # width x height cap of JPEG, below Pillow's own bomb guard (89 MP)
    min_side: int = 28  # images with a side shorter than this many pixels are refused
    max_aspect: float = 50.0  # long side / short side above this is refused; Qwen's processor raises above 200
    max_jpeg_scans: int = 64  # JPEG scans allowed; progressive encoders use ~10; each is a pass over the image
    max_jpeg_segments: int = 10_000  # JPEG segments allowed; cameras write a few dozen; Pillow reads them in Python
    max_png_chunks: int = 10_000  # PNG chunks allowed; 20 MB of 8 KB IDATs is ~2,500; Pillow walks them in Python

    @classmethod
    def preset(cls, name: Literal["serving", "batch", "training"], max_pixels: int | None = None) -> "DecodeLimits":
        """serving and batch scoring refuse odd geometry; training data is filtered by width first and
        only guarded against bombs, so a dataset's thin banners still count as rows, not errors.
        `max_pixels` sets both pixel caps (training decodes JPEGs in full when it augments)."""
        base = {"serving": cls(), "batch": cls(), "training": cls(min_side=1, max_aspect=1e9)}[name]
        if max_pixels is None:
            return base
        return dataclasses.replace(base, max_pixels=max_pixels, max_jpeg_pixels=max_pixels)


@dataclass(frozen=True)
class RequestLimits:
    max_body_mb: float = 20.0  # largest request body in MiB (2^20 bytes); a larger one gets a 413
    max_batch_images: int = 16  # most images in one /v1/detect/batch request; more is a 400
    # Seconds the whole body may take. The body is read before a request is admitted, so a slow or stalled
    # upload holds no scoring slot and is dropped with a 408 (1 MB/s needs 20 s for the cap).
    body_timeout_s: float = 30.0
    body_idle_timeout_s: float = 5.0  # longest wait for the body's next chunk, in seconds
    body_min_kbps: float = 8.0  # average upload rate in kB/s required once body_idle_timeout_s has passed
    # Seconds for decode + model, once admitted; past it the answer is a 503 + Retry-After. Set Serve's
    # http_options.request_timeout_s above body_timeout_s + timeout_s.
    timeout_s: float = 30.0


@dataclass(frozen=True)
class AuthConfig:
    """API keys for /v1/*; /healthz, /readyz and the docs stay open (probes, discovery).
    Keys: one per line in `keys_file`, and/or comma-separated in the env var `keys_env`; read by
    the router replicas at start (a replica with auth on and no key refuses to start)."""

    enabled: bool = False  # require an API key on /v1/* (401 without one, 403 with a wrong one)
    keys_env: str = "AIGD_API_KEYS"  # environment variable holding comma-separated API keys
    keys_file: Optional[str] = None  # file with one API key per line, on every router node; None: keys_env only


@dataclass(frozen=True)
class ProvenanceConfig:
    """What an image file declares about its origin (aigd.provenance): read beside every score, never
    used in it. Metadata can be stripped or forged; its absence means nothing."""

    enabled: bool = True  # false: answers carry no provenance block
    # the API: it is read beside the decode, in its own threads; once the image is decoded the block gets this
    # many seconds more, then the answer goes with a block that says so
    timeout_s: float = 2.0
    max_segments: int = 1000  # metadata segments / chunks walked before the image data (JPEG, PNG, WebP)
    max_xmp_kb: int = 512  # an XMP packet above this is not parsed
    max_text_chunks: int = 64  # PNG text chunks read (tEXt, zTXt, iTXt)
    max_text_kb: int = 256  # a text chunk's bytes after decompression
    max_c2pa_kb: int = 4096  # a C2PA manifest store (JUMBF) above this is not read
    include_generator_text: bool = False  # true: generator_text also carries the tool's text (often the prompt)
    # PEM file of C2PA trust anchors; set, a manifest signed under one of them reads `Trusted` instead of `Valid`
    c2pa_trust_anchors: str = ""

    def validate(self) -> None:
        if self.timeout_s <= 0 or min(self.max_segments, self.max_xmp_kb, self.max_text_chunks, self.max_text_kb,
                                      self.max_c2pa_kb) < 1:
            raise ConfigError("provenance: timeout_s must be > 0 and every max_* >= 1")


@dataclass(frozen=True)
class ScoringConfig:
    """What scoring needs, shared by serving, evaluation, batch scoring and `aigd score`."""

    model: ModelConfig = field(default_factory=ModelConfig)  # the base; it must be the one the adapters trained on
    image: Optional[ImagePolicy] = None  # None: the policy the adapters were trained with (their manifests)
    adapters: dict[str, str] = field(default_factory=dict)  # name -> registry entry (its newest version) or version folder
    thresholds: dict[str, float] = field(default_factory=dict)  # name -> decision threshold (default: manifest)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)  # how the adapters' answers are combined
    provenance: ProvenanceConfig = field(default_factory=ProvenanceConfig)  # what the file declares, beside the score

    def validate(self) -> None:
        if not self.adapters:
            raise ConfigError("adapters: name at least one exported adapter folder")
        unknown = set(self.ensemble.members) - set(self.adapters)
        if unknown:
            raise ConfigError(f"ensemble.members {sorted(unknown)} are not in adapters")


@dataclass(frozen=True)
class ShadowConfig:
    version: str  # the candidate version scored beside the serving one; it never changes an answer
    share: float = 0.1  # fraction of the member's live images also scored by the candidate, in (0, 1]
    # The most a live batch may wait behind shadow work on a replica: shadow batches are sized to it from
    # the measured time per shadow image (one image at least); sampled images beyond it are skipped, counted.
    budget_ms: float = 50.0

    def validate(self) -> None:
        if not 0 < self.share <= 1:
            raise ConfigError(f"shadow share {self.share}: must be in (0, 1]")
        if self.budget_ms <= 0:
            raise ConfigError(f"shadow budget_ms {self.budget_ms}: must be > 0")


@dataclass(frozen=True)
class ServingVersions:
    """The Detector deployment's `user_config`: which registry version answers for each adapter and
    which candidate shadows it. `aigd promote` changes it in place (Serve calls `reconfigure` on the
    running replicas); empty: the versions the app was deployed with."""

    versions: dict[str, str] = field(default_factory=dict)  # adapter name -> version, e.g. 20261201T101500123Z-1a2b3c4d
    shadow: dict[str, ShadowConfig] = field(default_factory=dict)  # adapter name -> candidate in shadow


EXPLAIN_METHODS = ("occlusion", "input_x_gradient", "integrated_gradients")


@dataclass(frozen=True)
class ExplainConfig:
    """How a map of where the evidence is gets made (aigd.explain): /v1/explain, `aigd explain`."""

    enabled: bool = True  # false: /v1/explain answers a JSON 404
    # occlusion: each region replaced by the baseline image, batched (model-agnostic, the faithfulness reference);
    # input_x_gradient: gradient x (input - baseline) (one forward + one backward); integrated_gradients: Captum's
    # integral from the baseline image (ig_steps forwards + backwards).
    method: Literal["occlusion", "input_x_gradient", "integrated_gradients"] = "occlusion"
    # What a region becomes when its evidence is removed: blur (the image under a Gaussian blur: the scene kept, the
    # fine texture where generators leave traces gone) or mean (the image's mean colour). Occlusion fills with it, the
    # gradient methods start from it, the evaluation's deletion curves fill with it.
    baseline: Literal["blur", "mean"] = "blur"
    blur_sigma: float = 1.0  # baseline blur: the Gaussian's sigma in pixels of the model's view
    occlusion_regions: int = 12  # occlusion: at most this many regions per side, each a block of 28-px tokens
    ig_steps: int = 8  # integrated_gradients: points on the path from the baseline image
    # Copies of the image (occluded or on the path) per forward pass; the scoring lock is released between
    # passes, so a /v1/detect batch waits behind one pass (bench/explain_cost.py: 4 doubled detect's p99, 2 did not).
    chunk: int = 2
    max_concurrent: int = 1  # explanations running at once per model replica; one more gets a 503
    timeout_s: float = 60.0  # seconds for an explanation once admitted (decode + every pass); then a 503
    region_threshold: float = 0.5  # region_boxes: connected areas of the map at or above this (the map peaks at 1)
    max_boxes: int = 5  # region_boxes: the strongest this many

    def validate(self) -> None:
        if min(self.occlusion_regions, self.ig_steps, self.chunk, self.max_concurrent, self.max_boxes) < 1:
            raise ConfigError("explain: occlusion_regions, ig_steps, chunk, max_concurrent and max_boxes must be >= 1")
        if self.timeout_s <= 0 or self.blur_sigma <= 0 or not 0 < self.region_threshold <= 1:
            raise ConfigError("explain: timeout_s and blur_sigma must be > 0, region_threshold in (0, 1]")


@dataclass(frozen=True)
class ExplainEvalConfig(ExplainConfig):
    """jobs/evaluate.py: are the maps faithful (deletion curves on test fakes) and do they find the
    pasted region of tampered rows (label 2, with masks, never trained on)?"""

    enabled: bool = False  # true: the job also measures the maps (slower: several passes per image)
    methods: list[str] = field(default_factory=lambda: ["occlusion", "input_x_gradient"])  # each one measured
    fakes: int = 32  # test-split fakes for the deletion curves, a fixed subset (hash of img_id)
    tampered: int = 40  # tampered rows with a mask for localization, a fixed subset; 0: none
    fractions: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.5])  # shares of regions removed
    random_draws: int = 3  # random orders averaged for the random-deletion curve
    iou_threshold: float = 0.5  # the map (peak 1) at or above this is the predicted region for IoU
    overlays: int = 4  # tampered rows drawn in the report, map beside mask

    def validate(self) -> None:
        super().validate()
        bad = [m for m in self.methods if m not in EXPLAIN_METHODS]
        if bad or not self.methods:
            raise ConfigError(f"explain.methods {bad or 'empty'}: known are {list(EXPLAIN_METHODS)}")
        if 0.0 not in self.fractions or any(not 0 <= f < 1 for f in self.fractions):
            raise ConfigError("explain.fractions must include 0.0 and lie in [0, 1)")
        if self.fakes < 1 or self.tampered < 0 or self.random_draws < 1:
            raise ConfigError("explain: fakes and random_draws must be >= 1, tampered >= 0")


@dataclass(frozen=True)
class ServeConfig(ScoringConfig):
    limits: DecodeLimits = field(default_factory=DecodeLimits)  # The API answers a refused image with a 422.
    request: RequestLimits = field(default_factory=RequestLimits)  # a request's body size, image count, deadlines
    auth: AuthConfig = field(default_factory=AuthConfig)
    detector: DetectorDeploymentConfig = field(default_factory=DetectorDeploymentConfig)
    router: RouterDeploymentConfig = field(default_factory=RouterDeploymentConfig)  # the HTTP (FastAPI) replicas
    retry_after_s: int = 1  # seconds in the Retry-After header of every 503 answer
    explain: ExplainConfig = field(default_factory=ExplainConfig)  # /v1/explain: maps of where the evidence is


@dataclass(frozen=True)
class GateConfig:
    """What `aigd promote` requires of a candidate version, from the evaluations recorded for it and
    for the serving version on the same evaluation set (jobs/evaluate.py records them)."""

    # Absolute floors: `<perturbation>.<metric>` -> the least (for ece, brier: the most) a candidate may have.
    floors: dict[str, float] = field(default_factory=lambda: {"clean.roc_auc": 0.95, "jpeg_q50.roc_auc": 0.90})
    # Figures compared with the serving version's on the same set; each may be worse by max_regression at most.
    compare: list[str] = field(default_factory=lambda: ["clean.roc_auc", "jpeg_q50.roc_auc"])
    max_regression: float = 0.01  # how much worse than the serving version a compared figure may be

    def validate(self) -> None:
        bad = [k for k in [*self.floors, *self.compare] if "." not in k]
        if bad:
            raise ConfigError(f"gate figures {bad}: name them <perturbation>.<metric>, e.g. clean.roc_auc")
        if self.max_regression < 0:
            raise ConfigError("max_regression must be >= 0")


@dataclass(frozen=True)
class PromoteConfig:
    """`aigd promote`: where versions live, which app serves them, and the gate."""

    registry: str = "${AIGD_HOME:-~/.cache/aigd}/adapters"  # the registry root: <root>/<name>/<version>/
    dashboard: str = "${AIGD_DASHBOARD:-http://127.0.0.1:8265}"  # the Ray dashboard of the app's cluster (Serve REST API)
    serve_app: str = "aigd"  # the Serve application's name
    gate: GateConfig = field(default_factory=GateConfig)  # what a candidate must meet
    timeout_s: float = 300.0  # how long a switch may take to reach every replica before it is undone


# The evaluation's perturbations by name (parsed by aigd.evaluation.perturb).
PERTURBATION = re.compile(r"clean|equalized|jpeg_q(?P<quality>\d+)|downscale_(?P<scale>[0-9.]+)|"
                          r"center_crop_(?P<crop>[0-9.]+)")


@dataclass(frozen=True)
class EvalConfig(ScoringConfig):
    # The images, filtered and hash-split as training does: with its salt and fractions, the same test rows.
    data: DataConfig = field(default_factory=DataConfig)
    split: Literal["train", "val", "test", "all"] = "test"  # the split scored; all: every row passing the filters
    # Every image is scored under each of these (clean required): clean, jpeg_q<Q> (JPEG at quality Q),
    # downscale_<F>, center_crop_<F> (sides times F), equalized (square crop + one JPEG format).
    perturbations: list[str] = field(default_factory=lambda: [
        "clean", "jpeg_q95", "jpeg_q85", "jpeg_q75", "jpeg_q65", "jpeg_q50", "jpeg_q30",
        "downscale_0.5", "downscale_0.25", "center_crop_0.5", "equalized"])
    # Every metric is also reported per value of these metadata columns: [generator] (the demo data,
    # image folders laid out by generator), or SID_Set's own [label] (real / synthetic / tampered).
    group_by: list[str] = field(default_factory=list)
    # A group's AUC needs this many images of each class; below it the group shows counts, no AUC.
    min_group_images: int = 10
    bootstrap: int = 200  # resamples for the clean metrics' 95% intervals; 0: no intervals
    calibrate: bool = False  # refit temperature + threshold on the val split, write them into manifests
    target_fpr: float = 0.05  # calibrate: also report the threshold with this false-positive rate on val reals
    batch_size: int = 16  # prepared images (perturbed copies included) per scoring batch, one forward per adapter
    decode_cpus: float = 1.0  # CPUs per task that decodes an image and makes its perturbed copies
    scorers: int = 1  # actors holding a model copy (a Scorer: base + every adapter)
    scorer_cpus: float = 1.0  # CPUs each scoring actor reserves
    scorer_gpus: float = 0.0  # GPUs each scoring actor reserves; 0: it scores on CPU
    explain: ExplainEvalConfig = field(default_factory=ExplainEvalConfig)  # faithfulness + localization of the maps
    out_dir: str = "${AIGD_HOME:-~/.cache/aigd}/eval"  # folder of the report, metrics.json and predictions.parquet

    def validate(self) -> None:
        super().validate()
        bad = [p for p in self.perturbations if not PERTURBATION.fullmatch(p)]
        if bad:
            raise ConfigError(f"perturbations {bad}: known are clean, jpeg_q<Q>, downscale_<F>, center_crop_<F>, "
                              "equalized")
        if "clean" not in self.perturbations:
            raise ConfigError("perturbations must include clean (the sweep is reported relative to it)")


ZOO_FAMILIES = ("gan_tconv", "ae_resize", "vae", "ddpm", "resample")


@dataclass(frozen=True)
class ZooConfig:
    """The generator families the demo's fakes come from (aigd.dev.zoo), trained on train-split photos."""

    # Families the fakes come from, in equal shares. gan_tconv: GAN upsampling with transposed convs;
    # ae_resize: autoencoder, nearest resize + conv; vae: variational autoencoder, sub-pixel conv decoder;
    # ddpm: denoising diffusion (DDIM sampling); resample: 2x box down + nearest / transposed-conv up, no training.
    families: tuple[str, ...] = ZOO_FAMILIES
    steps: int = 400  # optimizer steps per trained family
    batch_size: int = 16  # training crops per optimizer step
    patch: int = 32  # side of the training crops; the networks are fully convolutional
    width: int = 32  # base channel count of every network
    lr: float = 2.0e-3  # Adam learning rate of every trained family
    # ddpm: share of the noise schedule a real crop is noised to before DDIM denoises it back.
    ddpm_strength: float = 0.15
    ddim_steps: int = 5  # ddpm: DDIM steps that denoise a noised crop back
    # Trained weights are kept here, keyed by everything that shapes them (family, config, seed, photos).
    cache_dir: str = "${AIGD_HOME:-~/.cache/aigd}/zoo"

    def __post_init__(self):
        unknown = set(self.families) - set(ZOO_FAMILIES)
        if unknown or not self.families:
            raise ConfigError(f"zoo.families: {sorted(unknown) or 'empty'}; known: {list(ZOO_FAMILIES)}")


@dataclass(frozen=True)
class DemoDataConfig:
    out_dir: str = "${AIGD_HOME:-~/.cache/aigd}/demo-data"  # folder of data/*.parquet, samples/ and DEMO_DATA.json
    rows_per_class: int = 800  # real rows, and as many fakes (each pair drawn at one size and file format)
    tampered_rows: int = 40  # label-2 rows: a real crop with a resampled rectangle pasted in (SID_Set's tampered)
    small_rows: int = 40  # rows 56-84 px wide (half real, half fake): what a min_width of 112 drops
    # Unreadable rows (truncated, garbage, empty, header and scan bombs) that readers must skip and count.
    corrupt_rows: int = 0
    shards: int = 4  # parquet files the rows are spread over
    seed: int = 0  # seed of every draw: crops, sizes, formats, row order, the generators' training
    # The demo configs' data.test_fraction (split by photo, DataConfig's salt): it decides which photos
    # the generators may train on and where the held-out samples come from. 0.25 puts 4 of the 19
    # photos in test (0.15 left one).
    test_fraction: float = 0.25
    zoo: ZooConfig = field(default_factory=ZooConfig)


# --------------------------------------------------------------------------- loading


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^${}]*))?\}")


def expand(value: str) -> str:
    """`${VAR}` / `${VAR:-default}` (defaults may nest) and `~`: one config names paths on any machine."""

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is None:
            raise ConfigError(f"environment variable {name} is not set and has no default")
        return default

    while True:  # innermost first, so `${A:-${B:-x}/y}` works
        value, n = _ENV.subn(sub, value)
        if not n:
            return os.path.expanduser(value)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        kt, vt = args
        return {_coerce(k, kt, f"{key}.{k}"): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected a bool, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a float, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return expand(value)
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls: type, raw: dict, prefix: str = ""):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(prefix + k for k in unknown)} for {cls.__name__}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in raw.items()}
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs and
               f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing key(s) {', '.join(prefix + k for k in missing)} for {cls.__name__}")
    obj = cls(**kwargs)
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            _expand_defaults(obj, f.name, hints[f.name])
    if hasattr(obj, "validate"):  # rules across fields, once the whole section is built
        obj.validate()
    return obj


def _expand_defaults(obj, name: str, tp) -> None:
    """Defaults pass through the same `${VAR}` expansion as given values, in absent sections too."""
    value = getattr(obj, name)
    if tp is str:
        object.__setattr__(obj, name, expand(value))
    elif dataclasses.is_dataclass(value):
        hints = typing.get_type_hints(type(value))
        for f in dataclasses.fields(value):
            _expand_defaults(value, f.name, hints[f.name])


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
    node[leaf] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form a.b=value")
        key, text = item.split("=", 1)
        out.append((key.strip(), yaml.safe_load(text) if text != "" else ""))
    return out


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load(cls: type, path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None):
    """Build `cls` from `base` (a recipe's preset), a YAML file and dotted overrides, each on top
    of the one before; raises ConfigError."""
    raw: dict = {}
    if path is not None:
        text = Path(path).read_text()
        raw = yaml.safe_load(text) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    raw = _merge(base or {}, raw)
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(raw, key, value)
    return _build(cls, raw)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, raw: dict):
    return _build(cls, raw)


def replace(cfg, **changes):
    return dataclasses.replace(cfg, **changes)
