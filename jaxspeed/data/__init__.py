"""Text data: corpora, tokenizers and deterministic token-window batches."""

from jaxspeed.data.corpus import (
    PYTHON_DOCS,
    STDLIB_MODULES,
    load_corpus,
    load_text_files,
    python_docs_corpus,
    split_documents,
)
from jaxspeed.data.loader import (
    Batch,
    BatchIterator,
    TokenWindows,
    concat_tokens,
    make_datasets,
)
from jaxspeed.data.masking import MaskedLMBatches
from jaxspeed.data.tokenizers import (
    TOKENIZER_NAMES,
    BpeTokenizer,
    ByteTokenizer,
    Tokenizer,
    make_tokenizer,
)

__all__ = [
    "PYTHON_DOCS",
    "STDLIB_MODULES",
    "TOKENIZER_NAMES",
    "Batch",
    "BatchIterator",
    "BpeTokenizer",
    "ByteTokenizer",
    "MaskedLMBatches",
    "TokenWindows",
    "Tokenizer",
    "concat_tokens",
    "load_corpus",
    "load_text_files",
    "make_datasets",
    "make_tokenizer",
    "python_docs_corpus",
    "split_documents",
]
