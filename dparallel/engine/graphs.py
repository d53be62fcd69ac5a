"""One cached decode step captured in a CUDA graph (``cuda_graph=true`` with ``static_cache=true`` on a GPU).

A cached step (``ContextCache.step`` on the static path) has fixed shapes: ids and positions [B, Wq], the key mask
[B, 1, Wq, L] and the StaticCache's slots [B, H, L, D]. So it is captured once per (batch, query width, canvas
length) and replayed: before each replay the inputs are copied into the graph's own buffers and every layer's write
offset (``cumulative_length``, a device tensor with a static address) is set in place to the query's first
position. Replaying skips the per-kernel launch cost that dominates an eager step at batch 1 (REFERENCES.md:
27.9 ms eager against 11.1 ms captured for LLaDA-8B shapes on an H100).
"""

from __future__ import annotations

import torch

from dparallel.core.errors import require


class GraphStep:
    """Captured ``adapter.extend_static`` calls, one CUDA graph per input shape."""

    def __init__(self, adapter, cache):
        require(adapter.device.type == "cuda", "cuda_graph=true needs a CUDA device: drop it on CPU")
        self.adapter, self.cache = adapter, cache
        self.graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, dict, torch.Tensor]] = {}

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, attn: torch.Tensor, offset: int) -> torch.Tensor:
        key = (*ids.shape, attn.shape[1])
        if key not in self.graphs:
            self.graphs[key] = self._capture(ids, positions, attn, offset)
        graph, inputs, out = self.graphs[key]
        inputs["ids"].copy_(ids)
        inputs["positions"].copy_(positions)
        inputs["attn"].copy_(attn)
        self._set_offset(offset)
        graph.replay()
        return out.clone()  # the graph's output buffer is overwritten by the next replay

    def _set_offset(self, offset: int) -> None:
        """Every layer's write offset, in place and outside the graph (a captured fill would bake one value in)."""
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(offset)

    def _capture(self, ids, positions, attn, offset):
        inputs = {"ids": ids.clone(), "positions": positions.clone(), "attn": attn.clone()}

        def step() -> torch.Tensor:
            return self.adapter.extend_static(inputs["ids"], inputs["positions"], inputs["attn"], self.cache, None)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up on a side stream, as torch.cuda.graphs requires
            for _ in range(2):
                self._set_offset(offset)
                step()
        torch.cuda.current_stream().wait_stream(stream)
        self._set_offset(offset)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        return graph, inputs, out
