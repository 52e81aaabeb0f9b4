"""Attention over kvtrim's cache layers: stand-in types, their kernels, and the one function
registered with transformers (``kvtrim_sdpa``)."""

from kvtrim.attention.channels import select_channels, select_query_channels
from kvtrim.attention.interface import ATTENTION_NAME, KERNELS, enable, kvtrim_attention, register
from kvtrim.attention.standins import KeysStandIn, MaskedKV, PrunedKeys, RaggedKV

__all__ = [
    "ATTENTION_NAME",
    "KERNELS",
    "KeysStandIn",
    "MaskedKV",
    "PrunedKeys",
    "RaggedKV",
    "enable",
    "kvtrim_attention",
    "register",
    "select_channels",
    "select_query_channels",
]
