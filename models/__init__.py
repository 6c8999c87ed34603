"""Network definitions and the model registry.

Everything here is data plus ``nn.Module`` definitions; applying a model to long audio lives in
:mod:`demix.pipeline.engine` (overlap-add), away from the networks (the demucs ``apply.py`` habit).
"""

from demix.models.base import ModelLoadError, Separator
from demix.models.registry import ModelEntry, get_entry, list_models, load_model, register

__all__ = ["ModelEntry", "ModelLoadError", "Separator", "get_entry", "list_models", "load_model", "register"]
