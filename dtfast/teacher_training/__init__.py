"""Training the diffusion teachers that DreamTeacher distils (``python -m dtfast.train_teacher``)."""

from .config import TeacherTrainConfig, load_teacher_config
from .trainer import EMA, TeacherTrainer, export_teacher

__all__ = ["EMA", "TeacherTrainConfig", "TeacherTrainer", "export_teacher", "load_teacher_config"]
