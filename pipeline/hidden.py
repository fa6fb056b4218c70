"""Hidden states in the cache: which layers, an optional fixed projection, and their two encodings (no I/O).

**Layers.** Layer ``i`` is transformers' ``output_hidden_states`` entry ``i``: ``0`` is the
token embeddings (before any block), ``i`` the output of block ``i``, and ``L`` (the number
of blocks) the last entry, which transformers' causal LMs return *after* the final norm
(the very states the LM head reads; the teacher pass checks that entry against the
backbone's ``last_hidden_state``). Negative indices count from the end (``-1`` is ``L``)
and are stored resolved.

**Projection.** ``--hidden-dim D`` multiplies each state by a fixed ``(H, D)`` matrix of
``±1/sqrt(D)`` (Achlioptas' random projection: norms and dot products are kept in
expectation). Entry ``(i, j)`` is ``+`` when the lowest bit of
``splitmix64(splitmix64(seed) + i * D + j)`` is 0 (64-bit wrap-around; ``splitmix64`` as
for sampled captures), so a reader with numpy alone rebuilds it (:func:`projection`).

**Encodings** (one zstd frame per row and layer, byte-shuffled as every frame):

- ``hidden-bf16``: each value rounded to bfloat16 (round half to even), stored as ``<u2``
  (the high half of its float32 bits). Error: ``|x' - x| <= 2^-8 |x|``.
- ``hidden-int8``: per position ``t`` a scale ``s_t = max_j |x_tj| / 127`` (``<f4``, ``T``
  values) then ``round(x_tj / s_t)`` as ``int8`` (``T * D`` values), in one frame: scales
  first. Error: ``|x' - x| <= s_t / 2``, i.e. ``max_j |x_tj| / 254`` at position ``t``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from pipeline.codec import decode_array, encode_array
from pipeline.errors import CacheError, ConfigError

HiddenEncoding = Literal["bf16", "int8"]
ENCODINGS: dict[str, str] = {"bf16": "hidden-bf16", "int8": "hidden-int8"}
KIND = "hidden"
MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class HiddenSpec:
    """What the teacher pass stores of its hidden states: resolved ``layers`` of ``blocks`` blocks,
    ``width`` H wide, kept at ``dim`` D (projected when ``D < H``, by ``seed``), in ``encoding``."""

    layers: tuple[int, ...]
    blocks: int
    width: int
    dim: int
    encoding: HiddenEncoding
    seed: int = 0

    @property
    def projected(self) -> bool:
        return self.dim != self.width

    def columns(self) -> list[dict[str, Any]]:
        """The registry entries of the hidden-state columns: optional, so readers that do not know them skip them."""
        return [
            {"name": column_name(layer), "kind": KIND, "encoding": ENCODINGS[self.encoding], "required": False}
            for layer in self.layers
        ]

    def to_json(self) -> dict[str, Any]:
        """The manifest's ``hidden`` section."""
        return {
            "layers": list(self.layers),
            "indexing": "output_hidden_states: 0 embeddings, i after block i, blocks = after the final norm",
            "blocks": self.blocks,
            "width": self.width,
            "dim": self.dim,
            "encoding": ENCODINGS[self.encoding],
            "projection": {"kind": "rademacher-splitmix64/1", "seed": self.seed} if self.projected else None,
        }

    def projection_matrix(self) -> np.ndarray | None:
        return projection(self.seed, self.width, self.dim) if self.projected else None


def spec_for(
    layers: tuple[int, ...], encoding: HiddenEncoding, dim: int | None, seed: int, config: Any
) -> HiddenSpec | None:
    """The :class:`HiddenSpec` of ``--hidden-layers`` on a teacher with ``config`` (``None``: no layers asked)."""
    if not layers:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    blocks, width = getattr(text, "num_hidden_layers", None), getattr(text, "hidden_size", None)
    if not isinstance(blocks, int) or not isinstance(width, int):
        raise ConfigError("the teacher's config names no num_hidden_layers / hidden_size; --hidden-layers cannot apply")
    if dim is not None and dim > width:
        raise ConfigError(f"--hidden-dim {dim} is wider than the teacher's hidden size {width}; lower it or drop it")
    return HiddenSpec(resolve_layers(layers, blocks), blocks, width, dim or width, encoding, seed)


def column_name(layer: int) -> str:
    """The shard column of layer ``layer`` (resolved, non-negative): ``hidden_007``."""
    return f"hidden_{layer:03d}"


def resolve_layers(requested: tuple[int, ...], blocks: int) -> tuple[int, ...]:
    """``--hidden-layers`` as indices into ``output_hidden_states`` (``0 .. blocks``), sorted, each once."""
    resolved = []
    for layer in requested:
        if not -(blocks + 1) <= layer <= blocks:
            raise ConfigError(
                f"--hidden-layers {layer} is outside the teacher's hidden states 0 (embeddings) .. {blocks} "
                f"(after the final norm), or -1 .. -{blocks + 1} from the end"
            )
        resolved.append(layer % (blocks + 1))
    if len(set(resolved)) != len(resolved):
        raise ConfigError(f"--hidden-layers names a layer twice ({', '.join(map(str, requested))} resolved)")
    return tuple(sorted(resolved))


def _splitmix64(values: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = values + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def projection(seed: int, width: int, dim: int) -> np.ndarray:
    """The ``(width, dim)`` float32 projection of ``--hidden-dim`` (module docstring), from its seed."""
    keyed = _splitmix64(np.array([seed & MASK64], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        counters = keyed + np.arange(width * dim, dtype=np.uint64)
    signs = 1.0 - 2.0 * (_splitmix64(counters) & np.uint64(1)).astype(np.float32)
    return (signs / np.float32(np.sqrt(dim))).reshape(width, dim).astype(np.float32)


def to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> the ``<u2`` bits of the nearest bfloat16 (ties to even)."""
    as_float = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    return as_float.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def encode(values: np.ndarray, encoding: HiddenEncoding, level: int) -> bytes:
    """One row's ``(T, D)`` float32 states of one layer as one frame."""
    if encoding == "bf16":
        return encode_array(to_bf16_bits(values), "<u2", level)
    peaks = np.abs(values).max(axis=1)
    scales = (peaks / 127.0).astype(np.float32)
    safe = np.where(scales > 0, scales, np.float32(1.0))
    quantized = np.clip(np.rint(values / safe[:, None]), -127, 127).astype(np.int8)
    return encode_array(np.concatenate([scales.view(np.uint8), quantized.reshape(-1).view(np.uint8)]), "u1", level)


def decode(frame: bytes, encoding: HiddenEncoding, seq_len: int, dim: int) -> np.ndarray:
    """A frame of :func:`encode` -> ``(T, D)`` float32; a frame of another size is refused."""
    if encoding == "bf16":
        bits = decode_array(frame, "<u2", seq_len * dim).astype(np.uint32) << np.uint32(16)
        return bits.view(np.float32).reshape(seq_len, dim)
    raw = decode_array(frame, "u1", seq_len * 4 + seq_len * dim)
    scales = raw[: seq_len * 4].view("<f4").astype(np.float32)
    if not np.all(np.isfinite(scales)) or np.any(scales < 0):
        raise CacheError("a hidden-state frame holds a scale that is negative or not finite; the shard is corrupt")
    quantized = raw[seq_len * 4 :].view(np.int8).reshape(seq_len, dim).astype(np.float32)
    return quantized * scales[:, None]


def error_bound(values: np.ndarray, encoding: HiddenEncoding) -> np.ndarray:
    """The largest reconstruction error each of ``values`` (``(..., T, D)``) may have under ``encoding``."""
    if encoding == "bf16":
        return np.abs(values) * 2.0**-8
    return np.broadcast_to((np.abs(values).max(axis=-1) / 254.0)[..., None], values.shape) * (1 + 1e-6)


def bytes_per_token(encoding: HiddenEncoding, dim: int) -> float:
    """Bytes per token per layer before compression: what the option costs on paper."""
    return 2.0 * dim if encoding == "bf16" else dim + 4.0


MAX_HIDDEN_DIM = 1 << 16
MAX_ROW_VALUES = 1 << 26  # seq_len x dim a reader decodes per row and layer


def spec_from_manifest(raw: dict[str, Any], columns: list[dict[str, Any]], seq_len: int) -> HiddenSpec | None:
    """The manifest's ``hidden`` section checked against its column registry (``None``: no hidden states).

    Raises :class:`CacheError` naming the field on anything a writer of this format would not write.
    """
    section = raw.get("hidden")
    if section is None:
        return None

    def number(name: str, low: int, high: int) -> int:
        value = section.get(name) if isinstance(section, dict) else None
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise CacheError(
                f"manifest: hidden.{name} should be an integer in [{low}, {high}]; the manifest is damaged"
            )
        return value

    blocks = number("blocks", 1, 4096)
    width = number("width", 1, MAX_HIDDEN_DIM)
    dim = number("dim", 1, width)
    if seq_len * dim > MAX_ROW_VALUES:
        raise CacheError(f"manifest: hidden states of {seq_len} x {dim} values per row exceed what a reader decodes")
    encoding = {value: key for key, value in ENCODINGS.items()}.get(section.get("encoding"))
    if encoding is None:
        raise CacheError(
            f"manifest: hidden.encoding {str(section.get('encoding'))[:40]!r} is unknown; upgrade the package"
        )
    layers = section.get("layers")
    if (
        not isinstance(layers, list)
        or not layers
        or any(isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= blocks for layer in layers)
        or layers != sorted(set(layers))
    ):
        raise CacheError(f"manifest: hidden.layers should list distinct layers 0 .. {blocks} in order")
    projection = section.get("projection")
    seed = 0
    if dim != width:
        if not isinstance(projection, dict) or projection.get("kind") != "rademacher-splitmix64/1":
            raise CacheError("manifest: hidden.projection is not rademacher-splitmix64/1; upgrade the package")
        seed = projection.get("seed")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise CacheError("manifest: hidden.projection.seed should be an integer in [0, 2**63)")
    spec = HiddenSpec(tuple(layers), blocks, width, dim, encoding, seed)  # type: ignore[arg-type]
    registered = {column["name"]: column for column in columns}
    for column in spec.columns():
        found = registered.get(column["name"])
        if found is None or found.get("encoding") != column["encoding"] or found.get("kind") != KIND:
            raise CacheError(
                f"manifest: hidden layer column '{column['name']}' is not registered as {column['encoding']}"
            )
    return spec
