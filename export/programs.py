"""torch.export programs (format "torch-export") called by the model card's contract: the engines' torch backend
and the checker use the same matching of the card's names to a program's inputs."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from export.card import ModelCard


class ProgramError(ValueError):
    """A program that cannot be read or whose inputs are not the card's names: the message says which."""


class ExportedNetwork(torch.nn.Module):
    """A `torch.export` program (`.pt2`) called in the contract's order: encoder (z, tau, label), denoiser (z, t, tau,
    label, *features). Its inputs are matched by name (the card's names are the program's input names, i.e. its
    forward's parameter names); times are fed as the card's `time_input` says; an unconditional model gets no label.
    Returns the encoder's outputs as a tuple in the card's order, the denoiser's prediction as one tensor."""

    def __init__(self, path: Path, spec: ModelCard, role: str, convert_times: bool = True) -> None:
        """`convert_times=False`: the caller passes the times as the network takes them (the checker)."""
        super().__init__()
        try:
            program = torch.export.load(str(path))
        except Exception as e:  # torch raises several types for a file that is not a program
            raise ProgramError(f"torch.export.load could not read {path.name}: {str(e).splitlines()[0][:200]}") from e
        roles = spec.encoder.inputs() if role == "encoder" else spec.denoiser.inputs()
        self.times: tuple[int, ...] = (1,) if role == "encoder" else (1, 2)
        if not convert_times:
            self.times = ()
        names = list(program.graph_signature.user_inputs)
        position = {name: i for i, name in enumerate(roles) if name is not None}
        unknown = [n for n in names if n not in position]
        if unknown or len(names) != len(position):
            raise ProgramError(f"{path.name}: the program takes inputs {names}, the card names {sorted(position)}: "
                              "for format torch-export the card's names are the program's input names (its forward's "
                              "parameter names); python -m export.check says more")
        self.order = [position[n] for n in names]
        self.role, self.spec = role, spec
        self.net = program.module()

    def train(self, mode: bool = True) -> ExportedNetwork:
        """An exported program has no train/eval switch (torch refuses `eval()` on it): it runs as exported."""
        self.training = mode
        return self

    def forward(self, *args: Tensor) -> Tensor | tuple[Tensor, ...]:
        a = list(args)
        for i in self.times:
            a[i] = self.spec.time_feed(a[i])
        out = self.net(*(a[i] for i in self.order))
        if self.role == "encoder":
            return tuple(out) if isinstance(out, tuple | list) else (out,)
        return out[0] if isinstance(out, tuple | list) else out
