"""tl's LightningModules, picked by ``model.class_path`` in the configs (or ``--model NAME``)."""

from tl_cli.models.base import Classifier
from tl_cli.models.checkpoints import load_model, read_tl_checkpoint
from tl_cli.models.domain import DomainAdaptation
from tl_cli.models.feature_extraction import FeatureExtraction
from tl_cli.models.finetune import FineTune

__all__ = ["Classifier", "DomainAdaptation", "FeatureExtraction", "FineTune", "load_model", "read_tl_checkpoint"]
