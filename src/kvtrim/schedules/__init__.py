"""Schedules: when to evict — once after the prefill, after every chunk of it, or while decoding
(and, for a budget weighing all layers together, once the whole prefill is scored)."""

from kvtrim.schedules.across_layers import AcrossLayers
from kvtrim.schedules.after_prefill import AfterPrefill
from kvtrim.schedules.base import Schedule
from kvtrim.schedules.chunked import Chunked
from kvtrim.schedules.decoding import DecodingSchedule

__all__ = ["AcrossLayers", "AfterPrefill", "Chunked", "DecodingSchedule", "Schedule"]
