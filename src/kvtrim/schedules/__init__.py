"""Schedules: when to evict — once after the prefill, after every chunk of it, or while decoding."""

from kvtrim.schedules.after_prefill import AfterPrefill
from kvtrim.schedules.base import Schedule
from kvtrim.schedules.chunked import Chunked
from kvtrim.schedules.decoding import DecodingSchedule

__all__ = ["AfterPrefill", "Chunked", "DecodingSchedule", "Schedule"]
