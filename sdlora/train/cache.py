"""Caches that take the VAE and a frozen text encoder out of the training step.

Latents: each training image's VAE latent (the distribution's mean, scaled) is computed once,
kept in memory or on disk under `{output.dir}/cache/latents`, keyed by what produced it (the
image file, the exact crop and flip, the resolution, the VAE's weights and dtype), so a resumed
run or a second run on the same data reuses them and a run with another VAE never does. An
unreadable cache file (a truncated write) is recomputed.
Text: while the text encoder is frozen, each distinct caption is encoded once.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from sdlora.files import atomic_write
from sdlora.train.conditioning import TextEmbedding


def encode_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """(batch, 3, H, W) in [-1, 1] -> (batch, 4, H/8, W/8), scaled as the UNet expects."""
    latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * vae.config.scaling_factor).float()


class LatentCache:
    """Latents by dataset index; `mode` is "memory" or "disk". With paired data (before_dir)
    the originals' latents are kept too, in `before_batch`."""

    def __init__(self, vae, dataset, mode: str, folder: Path, show_progress: bool = True):
        self.latents: dict[int, torch.Tensor] = {}
        self.before_latents: dict[int, torch.Tensor] = {}
        self.vae, self.folder = vae, folder if mode == "disk" else None
        self.resolution = dataset.resolution
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.vae_fingerprint = vae_fingerprint(vae)
        with torch.no_grad():
            for index in tqdm(range(len(dataset)), desc="caching latents", disable=not show_progress):
                item = dataset.image(index)
                self.latents[index] = self._latent(item["pixel_values"], item["path"], item)
                if "before_pixel_values" in item:
                    self.before_latents[index] = self._latent(item["before_pixel_values"],
                                                              item["before_path"], item)
        self.vae = None

    def _latent(self, pixels: torch.Tensor, source: str, item: dict) -> torch.Tensor:
        path = None
        if self.folder is not None:
            key = _cache_key(source, item, self.resolution, self.vae_fingerprint)
            path = self.folder / f"{key}.safetensors"
            if path.is_file():
                try:
                    return load_file(path)["latent"]
                except Exception as error:  # noqa: BLE001 - a cache is rebuilt, never trusted
                    tqdm.write(f"latent cache file {path} is unreadable "
                               f"({type(error).__name__}); recomputing it")
        latent = encode_latents(self.vae, pixels[None])[0].cpu()
        if path is not None:
            atomic_write(path, lambda temp: save_file({"latent": latent}, temp))
        return latent

    def batch(self, indices: list[int]) -> torch.Tensor:
        return torch.stack([self.latents[index] for index in indices])

    def before_batch(self, indices: list[int]) -> torch.Tensor:
        return torch.stack([self.before_latents[index] for index in indices])


def _cache_key(source: str, item: dict, resolution: int, vae: str) -> str:
    """Identify a latent by its source file (path, size, mtime), the exact crop and flip, the
    resolution and the VAE (weights and dtype) that encoded it."""
    path = Path(source)
    stat = path.stat()
    parts = [str(path.resolve()), str(stat.st_size), str(stat.st_mtime_ns),
             str(tuple(item["target_size"])), str(tuple(item["crop_top_left"])),
             str(item.get("flipped", False)), str(resolution), vae]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def vae_fingerprint(vae) -> str:
    """A hash of the VAE's weights, names, shapes and dtypes: two bases share cached latents
    only when their VAEs are the same bytes (SD's VAE hashes in well under a second)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


class TextCache:
    """Frozen-encoder embeddings by caption; `encode(list[str]) -> TextEmbedding` fills misses."""

    def __init__(self, encode):
        self.encode = encode
        self.embeddings: dict[str, TextEmbedding] = {}

    def batch(self, captions: list[str]) -> TextEmbedding:
        for caption in captions:
            if caption not in self.embeddings:
                # One caption at a time: a CPU matmul's result depends on the batch it is in,
                # and an exact resume needs the same embedding whenever a caption first appears.
                with torch.no_grad():
                    self.embeddings[caption] = self.encode([caption]).to("cpu")
        return TextEmbedding.cat([self.embeddings[c] for c in captions])
