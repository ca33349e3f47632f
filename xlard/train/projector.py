"""R_phi's data and fitting: a FIFO buffer of decoded, scored latents and the fit loop.

The buffer holds whole rollout batches (a *slot* per decoded batch): the
latents that were decoded, the prompt embedding, the image-level sub-rewards
and which aspects were scored. The warm start fills it with randomly perturbed
latents around z0; every refresh adds the policy's own samples and drops the
oldest slot. :func:`fit_projector` runs the uncertainty-weighted regression
(:meth:`xlard.models.LatentRewardProjector.loss`, which also trains the
confidence head) over the buffer, with minibatches laid out the same way for any
number of processes (:func:`xlard.train.ppo.minibatch_layout`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from xlard.train.ppo import minibatch_layout

__all__ = ["Slot", "ProjectorBuffer", "fit_projector"]


@dataclass
class Slot:
    """One decoded rollout batch (this process's rows).

    Attributes:
        z (Tensor[n, C, H, W] float32): the decoded latents (corrected or perturbed).
        text_tokens, pooled, text_mask: the prompt embedding rows.
        target (Tensor[n, 3] float32): image sub-rewards, 0 where absent.
        present (bool Tensor[n, 3]): which aspects were scored.
        global_index (int64 Tensor[n]): the rows' indices in the global batch.
        global_size (int): rows in the global batch.
    """

    z: torch.Tensor
    text_tokens: torch.Tensor
    pooled: torch.Tensor
    text_mask: torch.Tensor
    target: torch.Tensor
    present: torch.Tensor
    global_index: torch.Tensor
    global_size: int

    def state(self) -> dict:
        return dict(self.__dict__)


class ProjectorBuffer:
    """A FIFO of at most ``capacity`` slots."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.slots: list[Slot] = []

    def add(self, slot: Slot) -> None:
        self.slots.append(slot)
        if len(self.slots) > self.capacity:
            self.slots.pop(0)

    def __len__(self) -> int:
        return len(self.slots)

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "slots": [s.state() for s in self.slots]}

    def load_state_dict(self, state: dict) -> None:
        self.capacity = state["capacity"]
        self.slots = [Slot(**s) for s in state["slots"]]


def fit_projector(model, projector, optimizer, buffer: ProjectorBuffer, epochs: int, slots: list[int] | None,
                  minibatches: int,
                  generator: torch.Generator, device, max_grad_norm: float = 1.0,
                  all_sum: Callable[[torch.Tensor], torch.Tensor] | None = None, world_size: int = 1) -> dict:
    """Fit R_phi and its confidence head on the buffer.

    Args:
        model: the module to call (``projector`` itself, or its DDP wrapper).
        projector: the :class:`xlard.models.LatentRewardProjector` (for ``loss``).
        optimizer: its optimiser.
        buffer: the data.
        epochs: passes over the chosen slots.
        slots: buffer positions to fit on (None: all).
        minibatches: minibatches per slot.
        generator: CPU generator for the slot order and the minibatch layouts
            (seeded identically on every process).
        device: where the model lives.
        max_grad_norm: gradient clipping (0 = off).
        all_sum: sums a tensor over the processes (None: one process).
        world_size: number of processes. The projector's loss is a mean over a
            minibatch's present (row, aspect) entries; with several processes
            each local loss is rescaled by ``local entries * world / global
            entries`` so that DDP's gradient average equals the gradient of the
            global mean, whatever the split.

    Returns:
        ``{"loss", "mse_count", "mse_color", "mse_position", "updates"}``: the loss averaged over the
        fit's minibatches, each aspect's MSE over all the present entries the fit saw (NaN for an
        aspect never present; everything NaN when nothing was fit), of the global minibatches (every
        process's entries; ``all_sum`` adds them up).
    """
    total, updates = 0.0, 0
    sq_sum, present_count = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    model.train()
    for _ in range(epochs):
        chosen = list(range(len(buffer))) if slots is None else list(slots)
        order = torch.randperm(len(chosen), generator=generator).tolist()
        for si in (chosen[i] for i in order):
            slot = buffer.slots[si]
            keys = torch.rand(slot.global_size, generator=generator)
            for rows in minibatch_layout(slot.global_index, minibatches, keys):
                pred = model(slot.z[rows].to(device), slot.text_tokens[rows].to(device), slot.pooled[rows].to(device),
                             slot.text_mask[rows].to(device), slot.present[rows].to(device))
                present = slot.present[rows].to(device)
                result = projector.loss(pred, slot.target[rows].to(device), present)
                loss = result.loss
                if all_sum is not None and world_size > 1:
                    local = present.sum().to("cpu", torch.float64).reshape(1)
                    factor = local.clamp_min(1.0) * world_size / all_sum(local).cpu().clamp_min(1.0)
                    loss = loss * factor.to(loss.device, loss.dtype).squeeze()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(projector.parameters(), max_grad_norm)
                optimizer.step()
                total += float(loss.detach())  # distributed: this process's part of the global minibatch's loss
                # per-aspect MSE over every present entry of the fit (a minibatch without the aspect adds nothing)
                n_present = present.sum(0).to("cpu", torch.float64)
                sq_sum += result.mse.detach().double().cpu() * n_present
                present_count += n_present
                updates += 1
    if not updates:
        nan = float("nan")
        return {"loss": nan, "mse_count": nan, "mse_color": nan, "mse_position": nan, "updates": 0}
    if all_sum is not None and world_size > 1:  # every process's entries: the global minibatches' numbers
        summed = all_sum(torch.cat([torch.tensor([total], dtype=torch.float64), sq_sum, present_count])).cpu()
        total = float(summed[0]) / world_size
        sq_sum, present_count = summed[1:4], summed[4:7]
    mse = torch.where(present_count > 0, sq_sum / present_count.clamp_min(1.0), torch.nan)
    return {"loss": total / updates, "mse_count": float(mse[0]), "mse_color": float(mse[1]),
            "mse_position": float(mse[2]), "updates": updates}
