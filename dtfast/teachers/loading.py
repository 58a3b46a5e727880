"""Finding a pretrained teacher: local diffusers folders, hub ids, and which layout a folder has."""

from __future__ import annotations

import json
import os
from pathlib import Path

LATENT_PARTS = ("vae", "unet", "scheduler", "text_encoder", "tokenizer")
LATENT_REQUIRED = ("vae", "unet")
PIXEL_UNETS = ("UNet2DModel",)
LATENT_UNETS = ("UNet2DConditionModel",)

# Weights and configs a teacher needs from a hub repository (not the single-file checkpoints next to them).
HUB_PATTERNS = [
    "*.json",
    "*.txt",
    "tokenizer/*",
    "diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
]
HUB_PATTERNS_BIN = [
    *HUB_PATTERNS[:3],
    "diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.bin",
    "vae/diffusion_pytorch_model.bin",
    "text_encoder/pytorch_model.bin",
]


def _download_help(name: str) -> str:
    return (
        f"On a machine with network access run `huggingface-cli download {name} --local-dir <DIR>` "
        f"(or `hf download {name} --local-dir <DIR>`), copy <DIR> here and pass teacher.pretrained=<DIR>."
    )


EMBEDDED_PREFIX = "embedded:"
TEACHER_INFO = "dtfast_teacher.json"  # written next to unet/ and scheduler/ by dtfast's exports
ASSETS = Path(__file__).resolve().parents[1] / "assets"


def embedded_teachers() -> list[str]:
    """Names of the teachers shipped inside the package (``dtfast/assets/<name>``)."""
    if not ASSETS.is_dir():
        return []
    # not the temporary folders of a ship or export in progress (.tmp_*, *.old)
    return sorted(p.name for p in ASSETS.iterdir()
                  if (p / TEACHER_INFO).is_file() and not p.name.startswith(".") and not p.name.endswith(".old"))


def resolve_pretrained(pretrained: str | os.PathLike) -> Path:
    """``embedded:<name>`` (a teacher shipped in dtfast/assets), a local folder as is; otherwise a hub id fetched
    (or found in the HF cache) with huggingface_hub."""
    text = os.fspath(pretrained)
    if text.startswith(EMBEDDED_PREFIX):
        name = text[len(EMBEDDED_PREFIX):]
        if name not in embedded_teachers():
            raise FileNotFoundError(f"teacher.pretrained={text!r}: no embedded teacher {name!r} in {ASSETS}; "
                                    f"shipped: {embedded_teachers() or 'none'}")
        return ASSETS / name
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"teacher.pretrained={text!r} is a file; expected a diffusers model folder")
        return path
    looks_like_path = text.startswith(("/", ".", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text
    if looks_like_path:
        raise FileNotFoundError(
            f"teacher.pretrained={text!r}: no such folder. Expected a diffusers model folder "
            "(UNet2DModel config.json at its root or in unet/, or a Stable Diffusion layout with vae/ and unet/)."
        )
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id=text, allow_patterns=HUB_PATTERNS))
        if not any(folder.glob("*.safetensors")) and not any(folder.glob("*/*.safetensors")):
            # older repositories ship only PyTorch pickles
            folder = Path(snapshot_download(repo_id=text, allow_patterns=HUB_PATTERNS_BIN))
        return folder
    except Exception as error:  # offline, no network, unknown repo, gated repo: all end the same way for the user
        raise OSError(
            f"teacher.pretrained={text!r} is not a local folder and could not be fetched from the Hugging Face hub "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). " + _download_help(text)
        ) from error


def _class_name(config_file: Path) -> str | None:
    if not config_file.is_file():
        return None
    try:
        return json.loads(config_file.read_text()).get("_class_name")
    except (json.JSONDecodeError, OSError) as error:
        raise ValueError(f"{config_file}: not a readable diffusers config ({error})") from error


def detect_layout(folder: Path) -> tuple[str, Path]:
    """('pixel', unet folder) or ('latent', model folder); ValueError saying what was expected otherwise."""
    if (folder / "vqvae").is_dir():
        raise ValueError(f"{folder}: a latent diffusion model with a VQ autoencoder (vqvae/, e.g. LDMPipeline) is "
                         "not a supported teacher: its UNet runs on VQ latents. Supported: a pixel-space UNet2DModel, "
                         f"or a Stable Diffusion layout ({', '.join(p + '/' for p in LATENT_PARTS)})")
    if (folder / "vae").is_dir() or (folder / "text_encoder").is_dir():
        missing = [p for p in LATENT_REQUIRED if not (folder / p / "config.json").is_file()]
        if missing:
            raise ValueError(
                f"{folder}: looks like a Stable Diffusion layout but {missing} (with config.json) is missing; "
                f"expected subfolders {list(LATENT_PARTS)}"
            )
        unet_class = _class_name(folder / "unet" / "config.json")
        if unet_class not in LATENT_UNETS:
            raise ValueError(f"{folder}/unet: expected a UNet2DConditionModel for a latent teacher, found {unet_class}")
        return "latent", folder
    for candidate in (folder, folder / "unet"):
        unet_class = _class_name(candidate / "config.json")
        if unet_class in PIXEL_UNETS:
            return "pixel", candidate
        if unet_class is not None and unet_class not in LATENT_UNETS:
            raise ValueError(f"{candidate}/config.json: {unet_class} is not a supported teacher UNet (UNet2DModel)")
    if (folder / "teacher" / TEACHER_INFO).is_file():
        raise ValueError(f"{folder} is a dtfast.train_teacher run folder; its teacher is {folder / 'teacher'}: pass "
                         f"teacher.pretrained={folder / 'teacher'}")
    entries = sorted(p.name for p in folder.iterdir())[:20]
    raise ValueError(
        f"{folder}: no diffusers teacher found. Expected a UNet2DModel (config.json + diffusion_pytorch_model"
        f".safetensors) at the root or in unet/ (scheduler/ optional), or a Stable Diffusion layout "
        f"({', '.join(p + '/' for p in LATENT_PARTS)}). The folder holds: {entries}"
    )


def scheduler_folder(folder: Path) -> Path | None:
    """Where the noise scheduler's config is in a model folder: `scheduler/`, or the folder itself."""
    for candidate in (folder / "scheduler", folder):
        if (candidate / "scheduler_config.json").is_file():
            return candidate
    return None
