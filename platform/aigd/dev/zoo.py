"""A zoo of small image generators, trained here on crops of the train-split photos, that make the
demo data's fakes: each family leaves the traces its architecture leaves, not one shared pattern.

Every family is image-to-image: it takes a crop of a photo (larger than the row's size) and returns
a generated image of the same size, which is then cropped to the row's size, never resized (a
resize would erase the traces). Conditioning on a real crop keeps the content of fakes and reals
alike, so what separates them is how the image was made (the "aligned" fakes of recent detection
work); it also lets a 2-CPU machine train every family in seconds, where unconditional generators
of photos would need hours. The families:

- gan_tconv: a super-resolution GAN (L1 + PatchGAN loss) whose generator upsamples a 4x smaller
  copy with two stride-2 transposed convolutions (checkerboard traces);
- ae_resize: an autoencoder whose decoder upsamples with nearest-neighbour resize + convolution;
- vae: a variational autoencoder; fakes decode a sample of the posterior, through sub-pixel
  convolutions (PixelShuffle);
- ddpm: a denoising diffusion model (small U-Net, epsilon prediction, linear betas); fakes noise a
  crop to `ddpm_strength` of the schedule and denoise it back with DDIM (SDEdit);
- resample: 2x box downsample, then nearest or stride-2 transposed-conv upsampling (no training).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from aigd.config import ZooConfig, expand

TRAINED = ("gan_tconv", "ae_resize", "vae", "ddpm")
MARGIN = 8  # canvas pixels generated around the row on each side, then cropped away (border effects)
DDPM_T = 1000


# --------------------------------------------------------------------------- networks


def _conv(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride, padding=(k - stride + 1) // 2)


def _encoder(w: int, out: int) -> nn.Sequential:
    """Down 4x with strided convolutions."""
    return nn.Sequential(_conv(3, w), nn.ReLU(), _conv(w, w, 4, 2), nn.ReLU(), _conv(w, 2 * w, 4, 2), nn.ReLU(),
                         _conv(2 * w, out))


class SuperResolver(nn.Module):
    """gan_tconv's generator: a 4x smaller image up through two transposed convolutions."""

    def __init__(self, w: int):
        super().__init__()
        self.net = nn.Sequential(
            _conv(3, 2 * w), nn.ReLU(), _conv(2 * w, 2 * w), nn.ReLU(),
            nn.ConvTranspose2d(2 * w, w, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(w, w, 4, 2, 1), nn.ReLU(),
            _conv(w, 3))

    def forward(self, x):
        return torch.tanh(self.net(F.avg_pool2d(x, 4)))


class ResizeConvAE(nn.Module):
    def __init__(self, w: int, latent: int = 8):
        super().__init__()
        self.enc = _encoder(w, latent)
        self.dec = nn.Sequential(
            _conv(latent, 2 * w), nn.ReLU(), nn.Upsample(scale_factor=2, mode="nearest"), _conv(2 * w, w), nn.ReLU(),
            nn.Upsample(scale_factor=2, mode="nearest"), _conv(w, w), nn.ReLU(), _conv(w, 3))

    def forward(self, x):
        return torch.tanh(self.dec(self.enc(x)))


class VAE(nn.Module):
    def __init__(self, w: int, latent: int = 4):
        super().__init__()
        self.enc = _encoder(w, 2 * latent)
        self.dec = nn.Sequential(
            _conv(latent, 2 * w), nn.ReLU(), _conv(2 * w, 4 * w), nn.PixelShuffle(2), nn.ReLU(),
            _conv(w, 4 * w), nn.PixelShuffle(2), nn.ReLU(), _conv(w, 3))

    def posterior(self, x):
        mu, logvar = self.enc(x).chunk(2, dim=1)
        return mu, logvar.clamp(-8, 4)

    def forward(self, x, generator: torch.Generator | None = None):
        mu, logvar = self.posterior(x)
        eps = torch.randn(mu.shape, generator=generator)
        return torch.tanh(self.dec(mu + eps * torch.exp(0.5 * logvar)))


def _time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    freqs = torch.exp(-math.log(10_000) * torch.arange(dim // 2) / (dim // 2))
    ang = t.float()[:, None] * freqs[None]
    return torch.cat([ang.sin(), ang.cos()], dim=1)


class UNet(nn.Module):
    """ddpm's noise predictor: two levels down, nearest-resize up, skip connections."""

    def __init__(self, w: int):
        super().__init__()
        self.w = w
        self.temb = nn.Sequential(nn.Linear(w, 2 * w), nn.SiLU(), nn.Linear(2 * w, 2 * w))
        self.inc = nn.Sequential(_conv(3, w), nn.SiLU())
        self.down1 = nn.Sequential(_conv(w, 2 * w, 4, 2), nn.SiLU())
        self.down2 = nn.Sequential(_conv(2 * w, 2 * w, 4, 2), nn.SiLU(), _conv(2 * w, 2 * w), nn.SiLU())
        self.up1 = nn.Sequential(_conv(4 * w, 2 * w), nn.SiLU())
        self.up2 = nn.Sequential(_conv(3 * w, w), nn.SiLU(), _conv(w, 3))

    def forward(self, x, t):
        h0 = self.inc(x)
        h1 = self.down1(h0)
        h2 = self.down2(h1) + self.temb(_time_embedding(t, self.w))[:, :, None, None]
        u1 = self.up1(torch.cat([F.interpolate(h2, scale_factor=2.0, mode="nearest"), h1], dim=1))
        return self.up2(torch.cat([F.interpolate(u1, scale_factor=2.0, mode="nearest"), h0], dim=1))


class PatchDiscriminator(nn.Module):
    def __init__(self, w: int):
        super().__init__()
        self.net = nn.Sequential(_conv(3, w, 4, 2), nn.LeakyReLU(0.2), _conv(w, 2 * w, 4, 2), nn.LeakyReLU(0.2),
                                 _conv(2 * w, 1))

    def forward(self, x):
        return self.net(x)


def alphas_bar() -> torch.Tensor:
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, DDPM_T), dim=0)


# --------------------------------------------------------------------------- training


def build(family: str, w: int) -> nn.Module:
    return {"gan_tconv": SuperResolver, "ae_resize": ResizeConvAE, "vae": VAE, "ddpm": UNet}[family](w)


def _batches(patches: torch.Tensor, cfg: ZooConfig, gen: torch.Generator):
    for _ in range(cfg.steps):
        yield patches[torch.randint(len(patches), (cfg.batch_size,), generator=gen)]


def _train_gan(g: SuperResolver, patches, cfg: ZooConfig, gen) -> None:
    d = PatchDiscriminator(cfg.width)
    opt_g = torch.optim.Adam(g.parameters(), cfg.lr, betas=(0.5, 0.99))
    opt_d = torch.optim.Adam(d.parameters(), cfg.lr, betas=(0.5, 0.99))
    for x in _batches(patches, cfg, gen):
        fake = g(x)
        loss_d = F.softplus(-d(x)).mean() + F.softplus(d(fake.detach())).mean()
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        loss_g = F.l1_loss(fake, x) + 0.02 * F.softplus(-d(fake)).mean()
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()


def _loss(family: str, model: nn.Module, x: torch.Tensor, gen: torch.Generator, ab: torch.Tensor) -> torch.Tensor:
    if family == "ae_resize":
        return F.l1_loss(model(x), x)
    if family == "vae":
        mu, logvar = model.posterior(x)
        z = mu + torch.randn(mu.shape, generator=gen) * torch.exp(0.5 * logvar)
        kl = -0.5 * torch.mean(1 + logvar - mu.pow(2) - logvar.exp())
        return F.l1_loss(torch.tanh(model.dec(z)), x) + 1e-3 * kl
    t = torch.randint(DDPM_T, (len(x),), generator=gen)
    eps = torch.randn(x.shape, generator=gen)
    a = ab[t][:, None, None, None]
    return F.mse_loss(model(a.sqrt() * x + (1 - a).sqrt() * eps, t), eps)


def train(family: str, patches: torch.Tensor, cfg: ZooConfig, seed: int) -> nn.Module:
    """One family's network fitted on patches in [-1, 1] (N, 3, patch, patch)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build(family, cfg.width)
    if family == "gan_tconv":
        _train_gan(model, patches, cfg, gen)
    else:
        opt = torch.optim.Adam(model.parameters(), cfg.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
        ab = alphas_bar()
        for x in _batches(patches, cfg, gen):
            loss = _loss(family, model, x, gen, ab)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


# --------------------------------------------------------------------------- generation


@torch.no_grad()
def _sdedit(unet: UNet, x: torch.Tensor, cfg: ZooConfig, gen: torch.Generator) -> torch.Tensor:
    """Noise x to t0 = strength * T, then deterministic DDIM steps back to t = 0."""
    ab = alphas_bar()
    t0 = max(1, int(cfg.ddpm_strength * DDPM_T)) - 1
    ts = np.linspace(t0, 0, cfg.ddim_steps + 1).round().astype(int)
    x = ab[t0].sqrt() * x + (1 - ab[t0]).sqrt() * torch.randn(x.shape, generator=gen)
    for t, t_next in zip(ts[:-1], ts[1:]):
        eps = unet(x, torch.full((len(x),), int(t)))
        x0 = ((x - (1 - ab[t]).sqrt() * eps) / ab[t].sqrt()).clamp(-1, 1)
        x = x0 if t_next == t else ab[t_next].sqrt() * x0 + (1 - ab[t_next]).sqrt() * eps
    return x0


@torch.no_grad()
def generate(family: str, model: nn.Module, canvases: np.ndarray, cfg: ZooConfig, seed: int) -> np.ndarray:
    """uint8 (N, H, W, 3) canvases of one size -> generated uint8 images of the same size."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(canvases).permute(0, 3, 1, 2).float() / 127.5 - 1
    if family == "ddpm":
        y = _sdedit(model, x, cfg, gen)
    elif family == "vae":
        y = model(x, gen)
    else:
        y = model(x)
    return ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def resample(a: np.ndarray, kind: str) -> np.ndarray:
    """2x box down, then 2x nearest or stride-2 transposed-conv [k, 1, k] up (the `resample` family)."""
    a = a.astype(np.float32)
    h, w = a.shape[:2]
    small = a.reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
    if kind == "nearest":
        up = small.repeat(2, axis=0).repeat(2, axis=1)
    else:
        k = 0.54
        up = np.zeros((h, w, 3), np.float32)
        up[::2, ::2] = small
        rows = up.copy()
        rows[1:-1:2] = k * (up[:-2:2] + up[2::2])
        rows[-1] = k * up[-2]
        out = rows.copy()
        out[:, 1:-1:2] = k * (rows[:, :-2:2] + rows[:, 2::2])
        out[:, -1] = k * rows[:, -2]
        up = out / np.maximum(out.mean(), 1e-6) * a.mean()
    return np.clip(up + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- the cached zoo


def cache_key(family: str, cfg: ZooConfig, seed: int, photos: list[str]) -> str:
    shape = {k: getattr(cfg, k) for k in ("steps", "batch_size", "patch", "width", "lr")}
    raw = json.dumps({"family": family, "seed": seed, "photos": sorted(photos), "v": 1, **shape}, sort_keys=True)
    return f"{family}-{hashlib.sha256(raw.encode()).hexdigest()[:12]}"


def load_or_train(family: str, patches_fn, cfg: ZooConfig, seed: int, photos: list[str]) -> tuple[nn.Module, bool]:
    """(trained network, True if it came from the cache). `patches_fn()` makes the training crops."""
    path = Path(expand(cfg.cache_dir)) / f"{cache_key(family, cfg, seed, photos)}.pt"
    model = build(family, cfg.width)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), True
    model = train(family, patches_fn(), cfg, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model, False

