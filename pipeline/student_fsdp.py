"""``--fsdp``: the student's parameters, gradients and optimizer state sharded across torchrun's processes (FSDP2).

Each decoder layer is one ``fully_shard`` unit; the rest (embeddings, final norm, LM head)
is the root unit, a :class:`ShardedStudent` around the model. Keeping the input embedding
and the LM head in the root unit is what makes a tied head (``tie_word_embeddings``: one
parameter used at both ends) correct: FSDP needs a shared parameter inside one unit.

The training step runs the backbone once and the LM head chunk by chunk, with a backward
per chunk (:func:`pipeline.student.train_step_loss`). FSDP hooks only a unit's forward, so
:class:`ShardedStudent` exposes both halves as forward methods of the root
(``register_fsdp_forward_method``): its ``forward`` returns the hidden states, ``logits`` runs
the head on a chunk. Every backward reduce-scatters the gradients it produced and adds them
to the sharded gradients (the head's gradient reaches the root's shard over several
backwards, the embedding's over the last one too), so after a step each rank holds its shard
of the gradient averaged over every rank's rows: what :func:`pipeline.student_distributed.average_gradients`
gives the unsharded parameters.

Checkpoints and the final model are written from full tensors gathered on every rank and
written by rank 0 (:func:`full_state`), in the same safetensors layout as a single process's;
a checkpoint is loaded by sharding its full tensors as the parameters are (:func:`shard_like`).
Evaluation runs the sharded model on every rank, each over the whole held-out cache, so the
ranks' forwards stay in step; rank 0 writes the result.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

from pipeline import models
from pipeline.errors import ConfigError

LAYER_LISTS = ("layers", "h", "layer", "blocks")


class ShardedStudent(nn.Module):
    """The student as FSDP's root unit, its backbone and LM head as two forward methods.

    Used where :class:`~pipeline.models.LMHead` is: ``hidden_states(input_ids)`` ``(B, T)`` ->
    ``(B, T, H)``, ``logits(hidden)`` ``(N, H)`` -> ``(N, V)``; ``model`` is the wrapped model.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._parts = models.LMHead(model)

    def forward(self, input_ids: torch.Tensor, document_starts: torch.Tensor | None = None) -> torch.Tensor:
        return self._parts.hidden_states(input_ids, document_starts)

    def hidden_states(self, input_ids: torch.Tensor, document_starts: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, T)`` int64 ids -> ``(B, T, H)`` final hidden states, through the root's forward hooks."""
        return self(input_ids, document_starts)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(N, H)`` hidden states -> ``(N, V)`` logits (registered as a forward method of the root)."""
        return self._parts.logits(hidden)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The backbone's list of decoder layers, each of which becomes an FSDP unit."""
    backbone = models.LMHead(model).backbone
    for name in LAYER_LISTS:
        layers = getattr(backbone, name, None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    raise ConfigError(
        f"--fsdp cannot find the decoder layers of {type(model).__name__} (looked for "
        f"{', '.join(LAYER_LISTS)} on its backbone); drop --fsdp"
    )


def shard_student(model: nn.Module) -> ShardedStudent:
    """Shard ``model`` in place (each decoder layer, then the rest as the root); return the root.

    Every rank must hold the same weights first (:func:`pipeline.student_distributed.broadcast_parameters`).
    """
    for layer in decoder_layers(model):
        fully_shard(layer)
    root = ShardedStudent(model)
    fully_shard(root)
    register_fsdp_forward_method(root, "logits")
    return root


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a shard (a ``DTensor``)."""
    return any(isinstance(param, DTensor) for param in model.parameters())


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of ``tensor`` on every rank (a collective for a ``DTensor``; the tensor itself otherwise)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every shard gathered, on CPU; tied names share one tensor, as in the
    model. A collective: every rank calls it."""
    params = dict(model.named_parameters(remove_duplicate=False))  # tied names: one parameter object
    gathered: dict[int, torch.Tensor] = {}
    state = {}
    for name, tensor in model.state_dict().items():
        key = id(params.get(name, tensor))
        if key not in gathered:
            gathered[key] = full_tensor(tensor.detach()).cpu()
        state[name] = gathered[key]
    return state


def local_view(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a ``DTensor`` (its storage), or ``tensor`` itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def shard_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``tensor`` (whole, the same on every rank) sharded as ``like`` is, or as it is where ``like`` is whole."""
    if not isinstance(like, DTensor):
        return tensor
    return distribute_tensor(tensor.to(like.device, like.dtype), like.device_mesh, like.placements)
