"""The image tokenizer: a VQGAN with ViT-VQGAN's factorised, l2-normalised codebook.

Esser et al. 2021 (VQGAN: PatchGAN hinge loss) and Yu et al. 2021 (ViT-VQGAN:
Transformer encoder/decoder; codes looked up in a low-dimensional, l2-normalised space,
which keeps the codebook used). Two architectures: `patch`, an encoder over each code's
own pixels (and its neighbours') and a conv decoder at the code grid; `vit`, ViT-VQGAN's
Transformers. The quantiser (`model/quantizer.py`) has a cosine-similarity codebook,
projection to `codebook_dim`, k-means init, EMA updates and dead-code re-seeding.

Images are float tensors in [-1, 1], (B, 3, H, W); codes are int64 (B, h, w) with
h = H / downsample.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from parti_ops.model.config import ImageTokenizerConfig
from parti_ops.model.errors import ModelFolderError
from parti_ops.model.quantizer import FactorizedQuantizer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


# Options added since the first tokenizers were saved, with the value that keeps the
# behaviour of a folder or checkpoint written before them; their defaults differ.
EARLIER = {"scaled_lookup": False, "encoder_context": 0, "refine_candidates": 1}
# Positions whose codes `VQGAN.tokenize` changes together: this far apart on the grid.
REFINE_SPACING = 2


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels // 4), channels)


class ResBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int):
        super().__init__()
        self.body = nn.Sequential(
            _norm(channels_in),
            nn.SiLU(),
            nn.Conv2d(channels_in, channels_out, 3, padding=1),
            _norm(channels_out),
            nn.SiLU(),
            nn.Conv2d(channels_out, channels_out, 3, padding=1),
        )
        self.skip = (
            nn.Identity()
            if channels_in == channels_out
            else nn.Conv2d(channels_in, channels_out, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


class PatchEncoder(nn.Module):
    """A strided patch conv and 1x1 blocks, then `encoder_context` 3x3 blocks at the code grid.

    The patch conv and the 1x1 blocks see only each code's own downsample² pixels; each
    3x3 block widens that by one patch on every side (the default, one block: a code also
    sees its 8 neighbours' patches, enough to tell the thin tips of a small shape apart).
    With no context, equal patches get equal codes (a plain background is one code per
    colour wherever it is); a small context keeps plain patches far from any outline that
    predictable, while a wide receptive field would not.
    """

    def __init__(self, cfg: ImageTokenizerConfig):
        super().__init__()
        width = cfg.channels
        layers: list[nn.Module] = [nn.Conv2d(3, width, cfg.downsample, stride=cfg.downsample)]
        for _ in range(max(1, cfg.res_blocks) * 2):
            layers.append(_PointwiseBlock(width))
        layers += [_ContextBlock(width) for _ in range(cfg.encoder_context)]
        layers += [_ChannelNorm(width), nn.SiLU(), nn.Conv2d(width, cfg.latent_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)  # (B, latent_dim, h, w)


class _ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of each position (GroupNorm would pool over the image)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _PointwiseBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            _ChannelNorm(channels), nn.SiLU(), nn.Conv2d(channels, 2 * channels, 1), nn.SiLU(),
            nn.Conv2d(2 * channels, channels, 1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class _ContextBlock(nn.Module):
    """A residual 3x3 conv at the code grid: each code also sees its 8 neighbours' patches.

    Edges are padded by repeating the border codes' features, so that a plain background
    reads the same at the image's border as inside it.
    """

    def __init__(self, channels: int):
        super().__init__()
        conv = _ReplicatePadConv(channels, channels, 3, padding=1, padding_mode="replicate")
        self.body = nn.Sequential(
            _ChannelNorm(channels), nn.SiLU(), conv,
            _ChannelNorm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class _ReplicatePadConv(nn.Conv2d):
    """A 3x3 conv with `padding_mode="replicate"` (padding 1) that torch.compile can train.

    Under torch.compile the padding is built from slices instead: the compiled CPU
    backward of the replication-pad op fails a stride check (torch 2.13). Eager keeps
    the op, whose gradients the saved tokenizers were trained with; both forwards are equal.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            return super().forward(x)
        x = torch.cat([x[:, :, :1], x, x[:, :, -1:]], dim=2)
        x = torch.cat([x[..., :1], x, x[..., -1:]], dim=3)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class GridDecoder(nn.Module):
    """Convs at the code grid, then each position's features → its own downsample² pixels.

    As ViT-VQGAN's decoder ends (a linear map from each token to its patch's pixels), but
    with 3x3 convs for context: the width sits where the codes are, which on a CPU is
    several times cheaper than convs at full resolution, and sharper at the same cost.
    """

    def __init__(self, cfg: ImageTokenizerConfig):
        super().__init__()
        f, width = cfg.downsample, cfg.channels
        layers: list[nn.Module] = [nn.Conv2d(cfg.latent_dim, width, 3, padding=1)]
        layers += [ResBlock(width, width) for _ in range(cfg.res_blocks)]
        layers += [_norm(width), nn.SiLU(), nn.Conv2d(width, 3 * f * f, 1), nn.PixelShuffle(f)]
        self.net = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.net(latents)  # (B, 3, H, W)


class _ViT(nn.Module):
    """Pre-norm Transformer over the h*w patch tokens with learned positions."""

    def __init__(self, cfg: ImageTokenizerConfig, tokens: int):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, tokens, cfg.channels) * 0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.channels,
            cfg.vit_heads,
            4 * cfg.channels,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, cfg.vit_depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(x + self.pos))  # (B, h*w, channels)


class ViTEncoder(nn.Module):
    def __init__(self, cfg: ImageTokenizerConfig, image_size: int):
        super().__init__()
        self.patch = nn.Conv2d(3, cfg.channels, cfg.downsample, stride=cfg.downsample)
        self.vit = _ViT(cfg, (image_size // cfg.downsample) ** 2)
        self.out = nn.Linear(cfg.channels, cfg.latent_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch(images)  # (B, C, h, w)
        b, _, h, w = x.shape
        x = self.out(self.vit(x.flatten(2).transpose(1, 2)))  # (B, h*w, latent_dim)
        return x.transpose(1, 2).reshape(b, -1, h, w)


class ViTDecoder(nn.Module):
    def __init__(self, cfg: ImageTokenizerConfig, image_size: int):
        super().__init__()
        self.downsample = cfg.downsample
        self.inp = nn.Linear(cfg.latent_dim, cfg.channels)
        self.vit = _ViT(cfg, (image_size // cfg.downsample) ** 2)
        self.out = nn.Linear(cfg.channels, 3 * cfg.downsample**2)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        b, _, h, w = latents.shape
        x = self.out(self.vit(self.inp(latents.flatten(2).transpose(1, 2))))  # (B, h*w, 3*f*f)
        x = x.transpose(1, 2).reshape(b, 3 * self.downsample**2, h, w)
        return F.pixel_shuffle(x, self.downsample)  # (B, 3, H, W)


class VQGAN(nn.Module):
    """Encoder → factorised cosine-similarity quantiser → decoder.

    Args:
        config: the image tokenizer section of the config.
        image_size: side of the (square) images it tokenizes.
    """

    def __init__(self, *, config: ImageTokenizerConfig, image_size: int):
        super().__init__()
        self.config = config
        self.image_size = image_size
        self.grid = image_size // config.downsample
        if config.architecture == "vit":
            self.encoder: nn.Module = ViTEncoder(config, image_size)
            self.decoder: nn.Module = ViTDecoder(config, image_size)
        else:
            self.encoder, self.decoder = PatchEncoder(config), GridDecoder(config)
        self.quantizer = FactorizedQuantizer(
            dim=config.latent_dim,
            codebook_size=config.codebook_size,
            codebook_dim=config.codebook_dim,
            decay=config.codebook_decay,
            kmeans_init=config.kmeans_init,
            dead_code_threshold=config.dead_code_threshold,
            commitment_weight=config.commitment_weight,
            out_scale=config.codebook_dim**0.5 if config.scaled_lookup else 1.0,
        )

    def encode(
        self, images: torch.Tensor, quantize: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images → (quantised latents (B, D, h, w), codes (B, h, w), commitment loss)."""
        return self.quantizer(self.encoder(images), quantize)

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] → codes (B, h, w), as the decoder is trained on them.

        Each position starts with its nearest code. With `refine_candidates` k > 1, the
        positions are then visited in groups `REFINE_SPACING` apart; for each group and each
        of its k nearest codes the grid is decoded, and a position takes the candidate whose
        decoded patch is closest to the image's pixels if that lowers the patch's mean
        squared error by more than `refine_margin` (1 + 4 k decodes in all). Positions of
        a group still reach one another through the decoder's convs and norms, so a
        group's changes are kept only where they lower the whole image's error: an image
        never reconstructs worse than from its nearest codes. Nearest by cosine is not
        always best in pixels: the thin tips of a small shape in a colour the codebook
        rarely saw it in come back as a blob from the nearest code and as a tip from
        another. Training mode or not, nothing in the model changes.
        """
        k = min(self.config.refine_candidates, self.config.codebook_size)
        candidates = self.quantizer.nearest(self.encoder(images), k)
        codes = candidates[..., 0]
        if k == 1:
            return codes
        margin = self.config.refine_margin * 3 * self.config.downsample**2  # as a patch's sum
        errors = self._patch_errors(codes, images)
        h, w = codes.shape[1:]
        for row in range(REFINE_SPACING):
            for col in range(REFINE_SPACING):
                group = torch.zeros(h, w, dtype=torch.bool, device=codes.device)
                group[row::REFINE_SPACING, col::REFINE_SPACING] = True
                proposal, best = codes, errors
                for rank in range(1, k):
                    trial = torch.where(group, candidates[..., rank], proposal)
                    trial_errors = self._patch_errors(trial, images)
                    better = group & (trial_errors < best - margin)
                    proposal = torch.where(better, trial, proposal)
                    best = torch.where(better, trial_errors, best)
                proposed_errors = self._patch_errors(proposal, images)
                keep = (proposed_errors.sum(dim=(1, 2)) < errors.sum(dim=(1, 2)))[:, None, None]
                codes = torch.where(keep, proposal, codes)
                errors = torch.where(keep, proposed_errors, errors)
        return codes

    def _patch_errors(self, codes: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Summed squared error of each code's decoded patch against the image's (B, h, w)."""
        f = self.config.downsample
        squared = (self.decode_codes(codes) - images).square().sum(dim=1, keepdim=True)
        return F.avg_pool2d(squared, f)[:, 0] * f * f

    def decode(self, quantized: torch.Tensor) -> torch.Tensor:
        return self.decoder(quantized)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) → images (B, 3, H, W) in about [-1, 1]."""
        return self.decode(self.quantizer.lookup(codes))

    def forward(
        self, images: torch.Tensor, quantize: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        quantized, codes, commit = self.encode(images, quantize)
        return self.decode(quantized), codes, commit

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output weights, where VQGAN balances the GAN and reconstruction grads."""
        if isinstance(self.decoder, ViTDecoder):
            return self.decoder.out.weight
        head = [m for m in self.decoder.net if isinstance(m, nn.Conv2d)][-1]
        return head.weight

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write `model.safetensors` and `config.json` (the section plus the image size)."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, out / WEIGHTS, metadata={"format": "pt"})
        body = {"image_size": self.image_size, "image_tokenizer": dataclasses.asdict(self.config)}
        (out / CONFIG).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path) -> VQGAN:
        """Load a folder written by `save_pretrained` (safetensors only, nothing unpickled)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(path)
        try:
            body = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
            config = ImageTokenizerConfig.from_dict({**EARLIER, **body["image_tokenizer"]})
            model = cls(config=config, image_size=int(body["image_size"]))
            model.load_state_dict(load_file(folder / WEIGHTS))
        except (OSError, KeyError, TypeError, ValueError, RuntimeError, SafetensorError) as err:
            raise ModelFolderError(
                f"{folder}: not a usable image tokenizer folder ({err}); "
                "point at the output of `parti tokenizer image train`"
            ) from err
        return model.eval()


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017, as in VQGAN): one real/fake logit per overlapping patch.

    GroupNorm instead of BatchNorm, so the result does not depend on the batch split.
    """

    def __init__(self, channels: int, layers: int = 3):
        super().__init__()
        body: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers):
            stride = 2 if i < layers - 1 else 1
            body += [
                nn.Conv2d(width, width * 2, 4, stride, 1),
                _norm(width * 2),
                nn.LeakyReLU(0.2),
            ]
            width *= 2
        body.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*body)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)  # (B, 1, h', w') logits


class PerceptualLoss(nn.Module):
    """LPIPS-style distance on the hidden states of a local Hugging Face vision model.

    Any `AutoModel` folder whose forward takes `pixel_values` and returns hidden states
    (CLIP vision, ViT, DINOv2, ...). Features are unit-normalised per position and
    compared by mean squared difference, layer by layer (Zhang et al. 2018, unweighted).
    """

    def __init__(self, path: str | Path):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"image_tokenizer.perceptual_model={path}: no such folder; give a local "
                "Hugging Face vision model folder, or null to train without perceptual loss"
            )
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        config = getattr(config, "vision_config", config)
        model = AutoModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        self.net = getattr(model, "vision_model", model).eval().requires_grad_(False)
        self.size = int(getattr(config, "image_size", 224))
        mean, std = _pixel_stats(folder)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        both = torch.cat([images, target]) * 0.5 + 0.5  # [-1, 1] → [0, 1]
        both = F.interpolate(both, size=(self.size, self.size), mode="bilinear")
        states = self.net(pixel_values=(both - self.mean) / self.std, output_hidden_states=True)
        loss = images.new_zeros(())
        for hidden in states.hidden_states[1:]:
            a, b = F.normalize(hidden, dim=-1).chunk(2)
            loss = loss + (a - b).pow(2).sum(-1).mean()
        return loss / (len(states.hidden_states) - 1)


def _pixel_stats(folder: Path) -> tuple[list[float], list[float]]:
    """Normalisation from the folder's preprocessor_config.json, else 0.5 / 0.5."""
    path = folder / "preprocessor_config.json"
    if path.exists():
        body = json.loads(path.read_text(encoding="utf-8"))
        return list(body.get("image_mean", [0.5] * 3)), list(body.get("image_std", [0.5] * 3))
    return [0.5] * 3, [0.5] * 3


def to_unit(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) → float (B, 3, H, W) in [-1, 1]."""
    return images_uint8.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float (B, 3, H, W) in [-1, 1] → uint8 (B, H, W, 3), rounded and clamped."""
    pixels = images.detach().float().add(1.0).mul(127.5).round().clamp(0, 255)
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).contiguous()
