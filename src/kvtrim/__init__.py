"""kvtrim: compress the KV cache of Hugging Face causal LMs with real memory savings, offline.

>>> import kvtrim
>>> model, tokenizer = kvtrim.load_model()          # embedded SmolLM2-135M-Instruct
>>> session = kvtrim.compress(model, tokenizer, context, method="expected-attention", ratio=0.5)
>>> session.ask("Who is the chief keeper?")
"""

from kvtrim.batch import BatchSession
from kvtrim.engine import CompressionStats, Compressor, DecodingSchedule, compressing
from kvtrim.errors import KVTrimError
from kvtrim.methods import METHODS, LayerView, Scorer, make_scorer
from kvtrim.models import load_model
from kvtrim.session import Answer, Session, compress

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "Answer",
    "BatchSession",
    "CompressionStats",
    "Compressor",
    "DecodingSchedule",
    "KVTrimError",
    "LayerView",
    "Scorer",
    "Session",
    "compress",
    "compressing",
    "load_model",
    "make_scorer",
]
