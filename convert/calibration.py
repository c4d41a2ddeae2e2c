"""Calibration: per-expert routing statistics and per-level output errors on calibration text.

Owns (definitions: /work/shared/specs/compression.md):

- :func:`tokenize_windows` — calibration text -> token windows (HF ``tokenizer.json``),
  with a clear error when the text is too short;
- :func:`collect_stats` — streams the windows through a model (one window per
  forward; or, given a layer-streaming runner, every window through one
  decoder layer at a time, :class:`LayerObserver` — identical results) and,
  per MoE layer and expert, accumulates activation frequency,
  summed gate weight ``Σ g`` (g = the router weight renormalised over the
  token's top-k), EAN ``Σ ‖f(x)‖``, the REAP sum ``Σ g·‖f(x)‖``, the
  per-channel second moments diag(XᵀX) of the expert's inputs (gate/up input
  ``[H]`` and down input ``[I]``; the codecs weight their range search with
  them) and a bounded random sample of the expert's input rows;
- :func:`measure_level_errors` — per MoE layer, one layer at a time: encode
  each expert with a nested codec (activation-weighted), decode every level
  and measure ε = mean ‖f_level(x) − f(x)‖² on the expert's sampled inputs;
  only that layer's encodings are alive at once;
- :class:`CalibrationResult` with the importance scores (:meth:`~CalibrationResult.scores`),
  saved/loaded as ``.npz``.

The model is duck-typed on the engine's ``MoECausalLM`` surface
(``model(ids) -> logits``, ``moe_layers()``, ``add_routing_hook``,
``expert_provider``/``set_expert_provider``, expert views with
``ffn``/``gate``/``up``/``down``): this module imports nothing of the engine;
the caller builds the model. The measurement wraps the model's expert
provider for the duration of :func:`collect_stats` and restores it after.
The forward itself runs on whatever provider the caller loaded (the
reference resident provider holds every expert; the per-level measurement
holds one layer's encodings beyond that). The converter's CLI passes the
layer-streaming runner (``engine/streamed_calibration.py``: one layer's dense
weights and one expert in memory), so calibration memory does not grow with
the model.

Knows nothing about shard files, the scheduler or tokenizer chat templates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from moestream.convert.errors import MoestreamError

CRITERIA = ("reap", "frequency", "ean", "cc")
#: CC-MoE mix weight α of frequency vs mean gate.
CC_ALPHA = 0.5
DEFAULT_SEQ_LEN = 256
DEFAULT_MIN_TOKENS = 256
DEFAULT_MAX_SAMPLES = 256  # sampled input rows kept per expert for the level errors


class CalibrationError(MoestreamError):
    """Calibration cannot run on the given text/model (message says what to do)."""


# ------------------------------------------------------------------------------------ text
def read_calibration_text(paths: Sequence[str | Path]) -> str:
    """Concatenate calibration files (folders: their ``*.txt`` in name order).

    Raises:
        CalibrationError: a path that does not exist or holds no text file.
    """
    parts = []
    for p in map(Path, paths):
        files = sorted(p.glob("*.txt")) if p.is_dir() else [p]
        if not files or not all(f.is_file() for f in files):
            raise CalibrationError(f"calibration text {p} not found; pass --calib FILE (a UTF-8 text file or a folder "
                                   "of .txt files)")
        parts += [f.read_text(encoding="utf-8", errors="replace") for f in files]
    return "\n\n".join(parts)


def tokenize_windows(text: str, tokenizer_json: str | Path, seq_len: int = DEFAULT_SEQ_LEN,
                     max_windows: int | None = None, min_tokens: int = DEFAULT_MIN_TOKENS) -> list[list[int]]:
    """Split ``text`` into consecutive token windows of ``seq_len`` (the last one may be shorter).

    Args:
        text: calibration text.
        tokenizer_json: path of an HF ``tokenizer.json``.
        seq_len: tokens per window.
        max_windows: keep at most this many windows (evenly spread over the text).
        min_tokens: fewer tokens than this is an error.

    Raises:
        CalibrationError: the text is too short or there is no tokenizer.
    """
    from tokenizers import Tokenizer

    path = Path(tokenizer_json)
    if not path.is_file():
        raise CalibrationError(f"{path}: no tokenizer.json to tokenize the calibration text; "
                               "convert from an HF folder that has one")
    ids = Tokenizer.from_file(str(path)).encode(text, add_special_tokens=False).ids
    return split_windows(ids, seq_len, max_windows, min_tokens)


def split_windows(ids: Sequence[int], seq_len: int = DEFAULT_SEQ_LEN, max_windows: int | None = None,
                  min_tokens: int = DEFAULT_MIN_TOKENS) -> list[list[int]]:
    """Token ids -> windows (see :func:`tokenize_windows`).

    Raises:
        CalibrationError: fewer than ``min_tokens`` ids.
    """
    if len(ids) < max(min_tokens, 2):
        raise CalibrationError(f"calibration text is too short: {len(ids)} tokens, at least {max(min_tokens, 2)} "
                               "needed for meaningful expert statistics; pass a longer --calib file")
    wins = [list(ids[i:i + seq_len]) for i in range(0, len(ids), seq_len)]
    wins = [w for w in wins if len(w) >= 2]
    if max_windows is not None and len(wins) > max_windows:
        pick = np.linspace(0, len(wins) - 1, max_windows).round().astype(int)
        wins = [wins[i] for i in sorted(set(pick.tolist()))]
    return wins


# ------------------------------------------------------------------------------------ statistics
@dataclass
class LayerStats:
    """Per-expert statistics of one MoE layer (arrays indexed by expert id)."""

    n_experts: int
    hidden: int
    inter: int
    freq: np.ndarray = None  # type: ignore[assignment]  [E] tokens routed to the expert
    gate_sum: np.ndarray = None  # type: ignore[assignment]  [E] Σ g (renormalised over the top-k)
    ean: np.ndarray = None  # type: ignore[assignment]  [E] Σ ‖f(x)‖
    reap_sum: np.ndarray = None  # type: ignore[assignment]  [E] Σ g·‖f(x)‖
    act_in: np.ndarray = None  # type: ignore[assignment]  [E, H] Σ x²
    act_mid: np.ndarray = None  # type: ignore[assignment]  [E, I] Σ h², h = silu(gate x)·up x
    samples: dict[int, np.ndarray] = field(default_factory=dict)  # expert -> [≤S, H] input rows
    _keys: dict[int, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        E = self.n_experts
        for name, shape in (("freq", (E,)), ("gate_sum", (E,)), ("ean", (E,)), ("reap_sum", (E,)),
                            ("act_in", (E, self.hidden)), ("act_mid", (E, self.inter))):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(shape, dtype=np.float64))


@dataclass
class CalibrationResult:
    """What calibration measured; ``layers`` is keyed by MoE layer index.

    ``errors[layer]`` ``[E, L]`` (when measured) holds ε per expert and codec level
    (shard level numbering, 0 = lowest), for the codec named in ``errors_codec``.
    """

    layers: dict[int, LayerStats]
    tokens: int
    windows: int
    top_k: int
    errors: dict[int, np.ndarray] = field(default_factory=dict)
    errors_codec: str = ""

    def scores(self, criterion: str) -> dict[int, np.ndarray]:
        """Importance per expert per layer (higher = keep). See the module docstring.

        Raises:
            ValueError: unknown criterion (lists the known ones).
        """
        if criterion not in CRITERIA:
            raise ValueError(f"unknown pruning criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
        out = {}
        for layer, st in self.layers.items():
            n = np.maximum(st.freq, 1.0)
            if criterion == "frequency":
                s = st.freq.copy()
            elif criterion == "ean":
                s = st.ean.copy()
            elif criterion == "reap":
                s = st.reap_sum / n
            else:  # cc
                mean_gate = st.gate_sum / n
                f = st.freq / st.freq.sum() if st.freq.sum() > 0 else st.freq
                g = mean_gate / mean_gate.sum() if mean_gate.sum() > 0 else mean_gate
                s = CC_ALPHA * f + (1 - CC_ALPHA) * g
            out[layer] = s.astype(np.float64)
        return out

    def act_scales(self, layer: int, expert: int) -> dict[str, np.ndarray]:
        """diag(XᵀX) per projection input: gate/up ``[H]``, down ``[I]`` (for activation-weighted codecs)."""
        st = self.layers[layer]
        return {"gate_proj": st.act_in[expert], "up_proj": st.act_in[expert], "down_proj": st.act_mid[expert]}

    # --- persistence ---------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write an ``.npz`` (statistics, errors; input samples are not saved)."""
        arrays: dict[str, Any] = {"meta": np.array([self.tokens, self.windows, self.top_k]),
                                  "errors_codec": np.array(self.errors_codec)}
        for layer, st in self.layers.items():
            for name in ("freq", "gate_sum", "ean", "reap_sum", "act_in", "act_mid"):
                arrays[f"L{layer}.{name}"] = getattr(st, name)
            if layer in self.errors:
                arrays[f"L{layer}.errors"] = self.errors[layer]
        np.savez_compressed(path, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationResult":
        """Inverse of :meth:`save`."""
        z = np.load(path, allow_pickle=False)
        layers: dict[int, LayerStats] = {}
        errors: dict[int, np.ndarray] = {}
        for key in z.files:
            if not key.startswith("L"):
                continue
            lay, name = key[1:].split(".", 1)
            layer = int(lay)
            if name == "errors":
                errors[layer] = z[key]
                continue
            if layer not in layers:
                ai, am = z[f"L{layer}.act_in"], z[f"L{layer}.act_mid"]
                layers[layer] = LayerStats(ai.shape[0], ai.shape[1], am.shape[1])
            setattr(layers[layer], name, z[key])
        tokens, windows, top_k = (int(v) for v in z["meta"])
        return cls(layers, tokens, windows, top_k, errors, str(z["errors_codec"]))


class _Recorder:
    """Routing hook + provider wrapper that fills :class:`LayerStats`."""

    def __init__(self, stats: dict[int, LayerStats], max_samples: int, seed: int) -> None:
        self.stats = stats
        self.max_samples = max_samples
        self.rng = np.random.default_rng(seed)
        self.routing: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(self, layer: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
        self.routing[layer] = (ids.detach(), weights.detach().float())

    def observe(self, layer: int, expert: int, view: Any, x: torch.Tensor, y: torch.Tensor,
                keys: np.ndarray | None = None) -> None:
        """Accumulate one expert call; ``keys`` are the reservoir keys of its rows (default: the next draws)."""
        ids, w = self.routing[layer]
        hit = ids == expert  # [N, k]
        rows = torch.nonzero(hit.any(dim=1)).flatten()
        if rows.numel() != x.shape[0]:
            raise RuntimeError(f"calibration: layer {layer} expert {expert} got {x.shape[0]} rows, routing says "
                               f"{rows.numel()}; the MoE block's dispatch order changed")
        g = (w * hit).sum(dim=1)[rows] / w.sum(dim=1)[rows].clamp_min(1e-30)  # [n] renormalised gate
        norms = y.float().norm(dim=1)  # [n]
        st = self.stats[layer]
        xf = x.detach().float()
        st.freq[expert] += x.shape[0]
        st.gate_sum[expert] += float(g.sum())
        st.ean[expert] += float(norms.sum())
        st.reap_sum[expert] += float((g * norms).sum())
        st.act_in[expert] += (xf * xf).sum(dim=0).double().numpy()
        h = F.silu(F.linear(xf, view.gate.float())) * F.linear(xf, view.up.float())  # [n, I]
        st.act_mid[expert] += (h * h).sum(dim=0).double().numpy()
        self._sample(st, expert, xf.numpy(), self.rng.random(x.shape[0]) if keys is None else keys)

    def _sample(self, st: LayerStats, expert: int, rows: np.ndarray, keys: np.ndarray) -> None:
        if expert in st.samples:
            rows = np.concatenate([st.samples[expert], rows])
            keys = np.concatenate([st._keys[expert], keys])
        if rows.shape[0] > self.max_samples:  # reservoir: the rows with the smallest random keys
            keep = np.argsort(keys)[:self.max_samples]
            rows, keys = rows[keep], keys[keep]
        st.samples[expert] = np.ascontiguousarray(rows, dtype=np.float32)
        st._keys[expert] = keys


class _MeasuredView:
    def __init__(self, inner: Any, rec: _Recorder, layer: int, expert: int) -> None:
        self.inner, self.rec, self.layer, self.expert = inner, rec, layer, expert
        self.level = getattr(inner, "level", 0)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner.ffn(x)
        self.rec.observe(self.layer, self.expert, self.inner, x, y)
        return y


class _MeasuringProvider:
    """Wraps an expert provider: same views, each ``ffn`` call also recorded."""

    wants_hints = False

    def __init__(self, inner: Any, rec: _Recorder) -> None:
        self.inner, self.rec = inner, rec
        self.max_experts_per_acquire = getattr(inner, "max_experts_per_acquire", None)

    def hint(self, layer: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
        self.inner.hint(layer, ids, weights)

    def acquire(self, layer: int, expert_ids: Sequence[int], gate_weights: Sequence[float]) -> dict[int, Any]:
        views = self.inner.acquire(layer, expert_ids, gate_weights)
        return {e: _MeasuredView(v, self.rec, layer, e) for e, v in views.items()}

    def release(self, layer: int, expert_ids: Sequence[int]) -> None:
        self.inner.release(layer, expert_ids)

    def stats(self) -> dict:
        return self.inner.stats()


def _moe_shape(model: Any, layer: int) -> tuple[int, int, int]:
    args = model.args
    return int(model.model.layers[layer].mlp.num_experts), int(args.hidden_size), int(args.expert_intermediate_size)


def collect_stats(model: Any, windows: Iterable[Sequence[int]], max_samples: int = DEFAULT_MAX_SAMPLES,
                  seed: int = 0, progress: Callable[[int], None] | None = None,
                  on_layer: Callable[[CalibrationResult, int], None] | None = None) -> CalibrationResult:
    """Run the windows through ``model`` (no KV cache, one window per forward) and record expert statistics.

    Args:
        model: an engine ``MoECausalLM`` with an expert provider (duck-typed, see module docstring), or a
            layer-streaming runner (anything with ``stream_layers``, see :class:`LayerObserver`): then every
            window passes layer 0, then layer 1, ... and only one layer's weights are loaded at a time. Both
            give identical results.
        windows: token-id windows (:func:`split_windows`).
        max_samples: input rows kept per expert for :func:`measure_level_errors` (0: none; they take
            ``max_samples × hidden × 4`` bytes per expert).
        seed: sampling seed (the reservoir).
        progress: called with the token count after each window (streamed: after each layer, with the
            tokens that layer has processed so far over all layers).
        on_layer: ``(result, layer)`` called once a MoE layer's statistics are complete (streamed: right
            after that layer; whole model: after all windows, layer by layer) — e.g. to measure its level
            errors and drop its samples (:func:`measure_level_errors` with ``layers`` and ``drop_samples``).

    Returns:
        The statistics (no level errors unless ``on_layer`` measured them).

    Raises:
        CalibrationError: no windows.
    """
    windows = [list(w) for w in windows]
    if not windows:
        raise CalibrationError("no calibration windows; pass a longer --calib file")
    if hasattr(model, "stream_layers"):
        return _collect_streamed(model, windows, max_samples, seed, progress, on_layer)
    layers = list(model.moe_layers())
    stats = {layer: LayerStats(*_moe_shape(model, layer)) for layer in layers}
    rec = _Recorder(stats, max_samples, seed)
    inner = model.expert_provider
    model.set_expert_provider(_MeasuringProvider(inner, rec))
    model.add_routing_hook(rec.hook)
    tokens = n = 0
    try:
        with torch.no_grad():
            for w in windows:
                model(torch.tensor([list(w)], dtype=torch.long))
                tokens += len(w)
                n += 1
                if progress:
                    progress(tokens)
    finally:
        model.remove_routing_hook(rec.hook)
        model.set_expert_provider(inner)
    top_k = int(model.args.top_k)
    result = CalibrationResult(stats, tokens, n, top_k)
    for layer in layers:
        if on_layer:
            on_layer(result, layer)
    return result


class LayerObserver:
    """What a layer-streaming runner reports to; the runner's side of the contract.

    A runner (``engine/streamed_calibration.py``) exposes ``model`` (the model skeleton: ``args``,
    ``moe_layers()``, ``model.layers[i].mlp.num_experts`` / ``.top_k``) and
    ``stream_layers(windows, observer)``, which for each decoder layer in order runs every window
    through it and, for a MoE layer, calls :meth:`begin_layer`, then :meth:`routing` once per window in
    window order (the router's ``[T, k]`` ids and weights, as a routing hook sees them), then
    :meth:`expert` once per (expert, window) that window routes to the expert — experts in increasing
    id, and for each expert the windows in order — with exactly the rows and output the whole-model
    forward gives that expert in that window, then :meth:`end_layer`.

    The statistics then equal the whole-model ones: each (layer, expert) accumulates the same values
    in the same window order, and the reservoir keys of a call are the draws the whole-model run would
    make there (its draws go window by window, layer by layer, experts in increasing id; every token
    takes k draws per MoE layer), taken from the seeded stream at that position.
    """

    def __init__(self, rec: _Recorder, windows: Sequence[Sequence[int]], layer_k: Mapping[int, int], seed: int,
                 progress: Callable[[int], None] | None, on_layer: Callable[[int], None] | None) -> None:
        self.rec, self.seed, self.progress, self.on_layer = rec, seed, progress, on_layer
        self.lengths = [len(w) for w in windows]
        self.layer_k = dict(layer_k)
        per_token = sum(self.layer_k.values())
        self.window_base = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64) * per_token
        self.layer_base = {}
        acc = 0
        for layer in sorted(self.layer_k):
            self.layer_base[layer] = acc
            acc += self.layer_k[layer]
        self.tokens_done = 0
        self._routing: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._keys: dict[int, np.ndarray] = {}
        self._key_offset: dict[int, dict[int, int]] = {}

    def begin_layer(self, layer: int) -> None:
        """A MoE layer starts."""
        self._routing, self._keys, self._key_offset = {}, {}, {}

    def routing(self, layer: int, window: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """Window ``window``'s routing in ``layer`` (``[T, k]``)."""
        t, k = ids.shape
        if (t, k) != (self.lengths[window], self.layer_k[layer]):
            raise RuntimeError(f"calibration: layer {layer} window {window} routed {t} tokens to {k} experts each, "
                               f"expected {self.lengths[window]} x {self.layer_k[layer]}")
        self._routing[window] = (ids.detach(), weights.detach().float())
        start = int(self.window_base[window]) + self.lengths[window] * self.layer_base[layer]
        gen = np.random.Generator(np.random.PCG64(self.seed))  # == default_rng(seed); one draw per key
        gen.bit_generator.advance(start)
        self._keys[window] = gen.random(t * k)
        counts = torch.bincount(ids.reshape(-1)).tolist()  # rows per expert (a token picks distinct experts)
        offsets, acc = {}, 0
        for e, c in enumerate(counts):
            if c:
                offsets[e] = acc
                acc += c
        self._key_offset[window] = offsets

    def expert(self, layer: int, window: int, expert: int, view: Any, x: torch.Tensor, y: torch.Tensor) -> None:
        """One expert call: ``x [n, H]`` the rows window ``window`` sends to ``expert``, ``y`` its output."""
        self.rec.routing[layer] = self._routing[window]
        off = self._key_offset[window][expert]
        self.rec.observe(layer, expert, view, x, y, keys=self._keys[window][off:off + x.shape[0]])

    def end_layer(self, layer: int) -> None:
        """The MoE layer is done: its statistics are final."""
        self.tokens_done += sum(self.lengths)
        if self.progress:
            self.progress(self.tokens_done)
        if self.on_layer:
            self.on_layer(layer)


def _collect_streamed(runner: Any, windows: list[list[int]], max_samples: int, seed: int,
                      progress: Callable[[int], None] | None,
                      on_layer: Callable[[CalibrationResult, int], None] | None) -> CalibrationResult:
    model = runner.model
    layers = list(model.moe_layers())
    stats = {layer: LayerStats(*_moe_shape(model, layer)) for layer in layers}
    result = CalibrationResult(stats, sum(len(w) for w in windows), len(windows), int(model.args.top_k))
    layer_k = {layer: int(model.model.layers[layer].mlp.top_k) for layer in layers}
    obs = LayerObserver(_Recorder(stats, max_samples, seed), windows, layer_k, seed, progress,
                        (lambda layer: on_layer(result, layer)) if on_layer else None)
    with torch.no_grad():
        runner.stream_layers(windows, obs)
    return result


# ------------------------------------------------------------------------------------ level errors
def _ffn(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def measure_level_errors(result: CalibrationResult, expert_weights: Callable[[int, int], Mapping[str, torch.Tensor]],
                         nested: Any, experts: Mapping[int, Sequence[int]] | None = None,
                         progress: Callable[[int, int], None] | None = None, layers: Sequence[int] | None = None,
                         drop_samples: bool = False) -> CalibrationResult:
    """ε per (expert, level): mean over sampled inputs of ‖f_level(x) − f(x)‖², one layer at a time.

    Args:
        result: from :func:`collect_stats` (keeps its input samples).
        expert_weights: ``(layer, expert) -> {proj: tensor}`` full-precision weights (source ids).
        nested: a :class:`moestream.convert.nested_planes.NestedExpertCodec` (its codec and group size;
            each expert is encoded with its own activation scales).
        experts: layer -> source expert ids to measure (default all); others get ε = 0 rows.
        progress: called with (layer, experts done).
        layers: measure only these MoE layers (default all).
        drop_samples: free each measured layer's input samples afterwards.

    Returns:
        ``result`` with ``errors`` filled (``[E, L]`` per layer) and ``errors_codec`` set.
    """
    L = nested.n_levels()
    for layer, st in result.layers.items():
        if layers is not None and layer not in layers:
            continue
        ids = list(range(st.n_experts)) if experts is None or layer not in experts else list(experts[layer])
        err = np.zeros((st.n_experts, L), dtype=np.float64)
        pooled = [s for s in st.samples.values() if len(s)]
        fallback = np.concatenate(pooled)[:DEFAULT_MAX_SAMPLES] if pooled else None
        for done, e in enumerate(ids):
            w = {p: t.detach().float() for p, t in expert_weights(layer, e).items()}
            x_np = st.samples.get(e, fallback)
            if x_np is None:
                x_np = np.random.default_rng(e).standard_normal((16, st.hidden)).astype(np.float32)
            x = torch.from_numpy(x_np)
            y = _ffn(w["gate_proj"], w["up_proj"], w["down_proj"], x)
            enc = nested.encode_projs(w, result.act_scales(layer, e))
            for lvl in range(L):
                dq = {p: enc[p].torch_decode(lvl + 1) for p in enc}
                yq = _ffn(dq["gate_proj"], dq["up_proj"], dq["down_proj"], x)
                err[e, lvl] = float(((yq - y) ** 2).sum(dim=1).mean())
            if progress:
                progress(layer, done + 1)
        result.errors[layer] = err
        if drop_samples:
            st.samples.clear()
            st._keys.clear()
    result.errors_codec = nested.name
    return result
