"""Training and evaluating the VQGAN image tokenizer, unattended and resumable.

`train_vqgan` is deterministic on CPU for a given seed: the batch at step s is a
function of (seed, s), and every other random draw (k-means init, dead-code
re-seeding) comes from torch's global generator, whose state is checkpointed. So a
run stopped by SIGTERM and resumed equals an uninterrupted one, bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from parti_ops.model.config import ImageTokenizerConfig
from parti_ops.model.layout import CHECKPOINTS
from parti_ops.model.loop import (
    MetricsLogger,
    Progress,
    TrainState,
    arch_fields,
    batch_indices,
    train_loop,
)
from parti_ops.model.scenes import Scene, compare, heldout_pairs, read_scene
from parti_ops.model.vqgan import VQGAN, PatchDiscriminator, PerceptualLoss, to_uint8, to_unit


class _Networks:
    """The VQGAN, the discriminator and their optimisers."""

    def __init__(self, config: ImageTokenizerConfig, image_size: int, device: torch.device):
        torch.manual_seed(config.seed)
        self.config = config
        self.model = VQGAN(config=config, image_size=image_size).to(device)
        self.disc = PatchDiscriminator(config.disc_channels).to(device)
        # Adam with beta1 = 0.5, as VQGAN and ViT-VQGAN train their GANs.
        self.opt_g = torch.optim.Adam(self.model.parameters(), lr=config.lr, betas=(0.5, 0.9))
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=config.lr, betas=(0.5, 0.9))

    def state(self) -> TrainState:
        """What a checkpoint holds, torch's random state too: k-means and dead-code
        re-seeding draw from it."""
        modules = {"model": self.model, "disc": self.disc}
        return TrainState(modules, {"opt_g": self.opt_g, "opt_d": self.opt_d}, rng=True)


def train_vqgan(
    config: ImageTokenizerConfig,
    images: torch.Tensor,
    out_dir: str | Path,
    *,
    resume: bool = False,
    log_metrics: MetricsLogger | None = None,
    log_every: int = 50,
    progress: Progress | None = None,
) -> VQGAN:
    """Train on uint8 images (N, H, W, 3); returns the model, also saved to `out_dir`.

    Checkpoints go to `out_dir/checkpoints` every `checkpoint_every` steps, at the end,
    and on SIGTERM (then SystemExit with code 143).

    Args:
        resume: continue from the newest good checkpoint; without it, existing
            checkpoints are an error rather than silently overwritten.
        log_metrics: called with (metrics, step) every `log_every` steps.
        progress: called with (step, total) after each step.
    """
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
        raise ValueError(f"images: expected uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    size = images.shape[1]
    if images.shape[2] != size or size % config.downsample:
        raise ValueError(
            f"images are {size}x{images.shape[2]}: the image tokenizer needs square images whose"
            f" side is a multiple of image_tokenizer.downsample={config.downsample}"
        )
    out = Path(out_dir)
    # A GPU when there is one; bit-identical resumes are promised on CPU (the CUDA
    # generator and kernels are not checkpointed).
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # Built before the training state is seeded or restored: loading it must not move
    # the random stream that a resumed run continues.
    perceptual = PerceptualLoss(config.perceptual_model) if config.perceptual_model else None
    perceptual = perceptual.to(device) if perceptual else None
    nets = _Networks(config, size, device)
    if config.compile:
        nets.model.encoder.compile()
        nets.model.decoder.compile()

    def train_step(step: int) -> dict[str, float]:
        rows = batch_indices(step, config.batch_size, len(images), config.seed)
        batch = to_unit(images[rows].to(device, non_blocking=True))
        quantize = step >= int(config.quantize_after * config.steps)
        if quantize and config.kmeans_init and not bool(nets.model.quantizer.initted):
            _fit_codebook(nets.model, images, config, device)
        return _vqgan_step(nets, batch, perceptual, gan=step >= config.gan_start, quantize=quantize)

    nets.model.train(), nets.disc.train()
    train_loop(
        config,
        nets.state(),
        train_step,
        out / CHECKPOINTS,
        architecture={"image_size": size, **arch_fields(config)},
        resume=resume,
        log_every=log_every,
        log_metrics=log_metrics,
        throughput=lambda steps_per_s: {"images_per_s": steps_per_s * config.batch_size},
        progress=progress,
    )
    nets.model.eval().save_pretrained(out)
    if config.compile:  # the saved weights in an eager model, as encoding will run them
        return VQGAN.from_pretrained(out).to(device)
    return nets.model


def edge_weights(images: torch.Tensor, extra: float) -> torch.Tensor:
    """Per-pixel loss weights (B, 1, H, W), mean 1: pixels near an edge count 1 + `extra`.

    A pixel is near an edge when its 3x3 neighbourhood spans more than 0.05 (2.5 % of
    [-1, 1]) in some channel. Plain areas are most of the pixels and easy; shapes are told
    apart by their outlines, a few pixels each (a star's points against a circle's rim).
    """
    spread = F.max_pool2d(images, 3, 1, 1) + F.max_pool2d(-images, 3, 1, 1)  # (B, 3, H, W)
    weight = 1 + extra * (spread.amax(dim=1, keepdim=True) > 0.05).float()
    return weight / weight.mean()


@torch.no_grad()
def _fit_codebook(
    model: VQGAN, images: torch.Tensor, config: ImageTokenizerConfig, device: torch.device
) -> None:
    """k-means of the encoder's vectors over `kmeans_images` images drawn by the seed."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(config.seed))
    rows = order[: config.kmeans_images]
    vectors = [
        model.quantizer.normalized(model.encoder(to_unit(images[rows[i : i + 64]].to(device))))
        for i in range(0, len(rows), 64)
    ]
    model.quantizer.kmeans_init(torch.cat(vectors))


def _vqgan_step(
    nets: _Networks,
    x: torch.Tensor,
    perceptual: PerceptualLoss | None,
    *,
    gan: bool,
    quantize: bool = True,
) -> dict[str, float]:
    cfg, model, disc = nets.config, nets.model, nets.disc
    recon, codes, commit = model(x, quantize)
    weight = edge_weights(x, cfg.edge_weight) if cfg.edge_weight else 1.0
    l2 = ((recon - x).pow(2) * weight).mean()
    nll = cfg.l2_weight * l2
    metrics = {"loss/l2": l2.item()}
    if perceptual is not None and cfg.perceptual_weight:
        nll = nll + cfg.perceptual_weight * perceptual(recon, x)
    loss = nll + commit
    metrics["loss/commit"] = commit.item()
    if gan and cfg.gan_weight:
        disc.requires_grad_(False)  # the generator's loss trains the generator only
        g_loss = -disc(recon).mean()  # hinge GAN, generator side
        disc.requires_grad_(True)
        # VQGAN's adaptive weight: the GAN gradient scaled to the reconstruction's at the
        # decoder's last layer (Esser et al. 2021, eq. 7).
        nll_grad = torch.autograd.grad(nll, model.last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, model.last_layer, retain_graph=True)[0]
        d_weight = (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0, 1e4).detach()
        loss = loss + cfg.gan_weight * d_weight * g_loss
        metrics |= {"loss/g": g_loss.item(), "gan/adaptive_weight": d_weight.item()}
    nets.opt_g.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    nets.opt_g.step()
    if gan and cfg.gan_weight:
        real, fake = disc(x), disc(recon.detach())
        d_loss = F.relu(1 - real).mean() + F.relu(1 + fake).mean()
        nets.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        nets.opt_d.step()
        metrics["loss/d"] = d_loss.item()
    used = codes.unique().numel() / cfg.codebook_size
    metrics |= {"loss/total": loss.item(), "codebook/batch_usage": used}
    return metrics


@torch.inference_mode()
def reconstruct(
    model: VQGAN, images: torch.Tensor, batch_size: int, quantize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, H, W, 3) → (uint8 reconstructions, codes (N, h, w)).

    The codes are `VQGAN.tokenize`'s, as encoding makes them; with `quantize` False the
    decoder reads the encoder's normalised vectors themselves.
    """
    model.eval()
    device = next(model.parameters()).device
    recons, codes = [], []
    for start in range(0, len(images), batch_size):
        batch = to_unit(images[start : start + batch_size].to(device))
        if quantize:
            code = model.tokenize(batch)
            recon = model.decode_codes(code)
        else:
            recon, code, _ = model(batch, quantize)
        recons.append(to_uint8(recon).cpu())
        codes.append(code.cpu())
    return torch.cat(recons), torch.cat(codes)


def evaluate_vqgan(
    model: VQGAN,
    images: torch.Tensor,
    scenes: Sequence[Scene | None] | None = None,
    batch_size: int = 128,
) -> tuple[dict[str, float], torch.Tensor]:
    """Reconstruction metrics on held-out images; returns (metrics, reconstructions).

    PSNR and SSIM (torchmetrics, on [0, 255]) per image, averaged; codebook usage (share
    of codes used at least once) and perplexity (exp of the code entropy); and, where
    `scenes` are known, the attribute oracle's exact accuracy on the reconstructions, and
    two diagnostics of where it is lost:
    - `oracle_exact_unquantized`: the same with the decoder reading the encoder's vectors
      unquantised, so its gap to `oracle_exact` is what the codebook costs;
    - `oracle_objects_heldout_pair` / `oracle_objects_seen_pair`: the share of objects read
      back exactly among those whose (colour, shape) pair was kept out of training, and
      among the others.
    """
    from torchmetrics.functional.image import (
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    recon, codes = reconstruct(model, images, batch_size)
    target, pred = images.permute(0, 3, 1, 2).float(), recon.permute(0, 3, 1, 2).float()
    psnr = peak_signal_noise_ratio(
        pred, target, data_range=255.0, reduction="none", dim=(1, 2, 3)
    ).mean()
    ssim = structural_similarity_index_measure(pred, target, data_range=255.0)
    counts = torch.bincount(codes.flatten(), minlength=model.config.codebook_size).double()
    probs = counts / counts.sum()
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
    metrics = {
        "psnr": float(psnr),
        "ssim": float(ssim),
        "codebook_usage": float((counts > 0).double().mean()),
        "perplexity": float(entropy.exp()),
        "images": float(len(images)),
    }
    if scenes is not None and len(scenes) != len(recon):
        raise ValueError(f"{len(scenes)} scenes for {len(images)} images: give one per image")
    known = [i for i, s in enumerate(scenes or []) if s is not None]
    if known:
        truth = [scenes[i] for i in known]
        read = [read_scene(recon[i].numpy()) for i in known]
        results = [compare(p, s) for p, s in zip(read, truth, strict=True)]
        for key in ("exact", "shape", "colour", "position", "size", "count", "background"):
            metrics[f"oracle_{key}"] = float(np.mean([res[key] for res in results]))
        unquantized, _ = reconstruct(model, images[known], batch_size, quantize=False)
        metrics["oracle_exact_unquantized"] = float(
            np.mean([read_scene(r.numpy()) == s for r, s in zip(unquantized, truth, strict=True)])
        )
        held = heldout_pairs()
        found: dict[bool, list[bool]] = {True: [], False: []}
        for p, s in zip(read, truth, strict=True):
            for obj in s.objects:
                found[(obj.colour, obj.shape) in held].append(obj in p.objects)
        for is_held, name in ((True, "heldout_pair"), (False, "seen_pair")):
            if found[is_held]:
                metrics[f"oracle_objects_{name}"] = float(np.mean(found[is_held]))
    return metrics, recon


def reconstruction_grid(images: torch.Tensor, recon: torch.Tensor, pairs: int = 16) -> Image.Image:
    """A PNG-ready grid: each row holds (original | reconstruction) pairs, 4 pairs a row."""
    n = min(pairs, len(images))
    cells = [torch.cat([images[i], recon[i]], dim=1) for i in range(n)]  # (H, 2W, 3)
    per_row = 4
    while len(cells) % per_row:
        cells.append(torch.zeros_like(cells[0]))
    rows = [torch.cat(cells[i : i + per_row], dim=1) for i in range(0, len(cells), per_row)]
    return Image.fromarray(torch.cat(rows, dim=0).numpy())
