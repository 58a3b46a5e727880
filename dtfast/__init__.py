"""dtfast: fast DreamTeacher pretraining (distil diffusion-model features into timm backbones)."""

__version__ = "0.1.0"
