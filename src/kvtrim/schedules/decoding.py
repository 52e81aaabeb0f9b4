"""Eviction while decoding: long generations stay within ``tokens`` pairs per head.

After every forward that follows the prefill (the question, each decoded token), a layer whose
heads hold more than ``tokens`` pairs is evicted down to ``tokens − every + 1``: there is then
room for ``every − 1`` more tokens, so evictions happen once every ``every`` steps and the cache
never holds more than ``tokens`` pairs per head between steps (the step that triggers an eviction
attends over ``tokens + 1`` pairs, its own included). Scorers see each head's true positions and
the queries of the last ``query_window`` tokens (the prefill's last ones at first).
"""

from __future__ import annotations

from typing import Any

import torch

from kvtrim.cache.cam import cam_merge
from kvtrim.cache.keep import gather_pairs, keep_mask
from kvtrim.cache.merge import merge_evicted
from kvtrim.core.clock import device_time
from kvtrim.core.selection import top_indices
from kvtrim.core.stats import CompressionStats
from kvtrim.engine.call import LayerCall
from kvtrim.engine.eviction import PositionTracker
from kvtrim.schedules.base import Schedule
from kvtrim.scorers.base import Scorer


class DecodingSchedule(Schedule):
    """``prefill`` compresses the prefill (sharing ``positions``); then every later forward evicts
    with ``scorer`` once a layer holds more than ``tokens`` pairs per head."""

    def __init__(
        self,
        prefill: Schedule,
        scorer: Scorer,
        positions: PositionTracker,
        tokens: int,
        every: int = 16,
        query_window: int = 32,
        evicted: str = "drop",
    ):
        self.prefill, self.scorer, self.positions = prefill, scorer, positions
        #: "drop", "merge" (kvtrim.cache.merge) or "cam" (kvtrim.cache.cam) at every eviction
        self.evicted = evicted
        #: layer -> evictions so far while decoding (seeds CaM's draws: the same run, the same merges)
        self.evictions: dict[int, int] = {}
        self.tokens, self.every, self.query_window = tokens, every, query_window
        #: layer -> (projected queries (B, W, H·D), their positions (W,)): what scorers see
        self.recent: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def target(self) -> int:
        """Pairs per head left after an eviction."""
        return self.tokens - self.every + 1

    def on_forward(self, call: LayerCall) -> None:
        if self.prefill.takes(call):
            call.compress(self._compress_prefill)
        elif not call.is_sliding:
            start = device_time(call.device)
            self._evict_while_decoding(call)
            call.stats.decode_evict_s += device_time(call.device) - start

    def finish(self, cache: Any, n_tokens: int, stats: CompressionStats) -> CompressionStats:
        return self.prefill.finish(cache, n_tokens, stats)

    def snapshot(self) -> tuple[dict, dict, dict]:
        """What decoding changes (positions, recent queries, eviction counts), to put back with
        :meth:`restore`."""
        return dict(self.positions.positions), dict(self.recent), dict(self.evictions)

    def restore(self, state: tuple[dict, dict, dict]) -> None:
        self.positions.positions, self.recent, self.evictions = (dict(part) for part in state)

    def _compress_prefill(self, call: LayerCall) -> None:
        if call.projected is not None:
            self._remember_queries(call)
        self.prefill.compress_layer(call)

    def _remember_queries(self, call: LayerCall) -> None:
        """Keep the last ``query_window`` projected queries and their positions for this layer."""
        projected, positions = call.projected, call.query_positions()
        previous = self.recent.get(call.idx)
        if previous is not None:
            projected = torch.cat([previous[0], projected], dim=1)  # (B, W + q, H·D)
            positions = torch.cat([previous[1], positions])
        self.recent[call.idx] = (projected[:, -self.query_window :], positions[-self.query_window :])

    def _evict_while_decoding(self, call: LayerCall) -> None:
        """Evict the layer down to the target once its heads hold more than the budget."""
        layer = call.layer
        keys, values = layer.keys, layer.values  # (B, Hkv, T, D)
        key_positions = call.key_positions(keys, self.positions.get(call.idx))  # (B, Hkv, T) once tracked
        if call.projected is not None:
            self._remember_queries(call)
        if keys.shape[-2] <= self.tokens:
            self.positions.remember(call.idx, keys, key_positions, None)
            return
        recent, positions = self.recent[call.idx]
        view = call.view(
            keys, values, key_positions, projected=recent, query_positions=positions, budget_keep=self.target
        )
        scores = self.scorer.score(view)  # (B, Hkv, T)
        chosen = top_indices(scores, self.target)  # (B, Hkv, K)
        count = self.evictions.get(call.idx, 0)
        self.evictions[call.idx] = count + 1
        if self.evicted == "merge":
            values = merge_evicted(keys, values, keep_mask(chosen, keys.shape[-2]))  # (B, Hkv, T, D)
        elif self.evicted == "cam":
            draws = torch.Generator().manual_seed(call.seed * 1_000_003 + call.idx * 10_007 + count)
            values = cam_merge(values, keep_mask(chosen, keys.shape[-2]), scores, draws)  # (B, Hkv, T, D)
        layer.keys, layer.values = gather_pairs(keys, values, chosen)
        self.positions.remember(call.idx, keys, key_positions, chosen)
        call.stats.decode_evictions += 1
