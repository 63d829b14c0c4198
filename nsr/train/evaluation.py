"""Evaluation of a split: top-1 and top-5 accuracy, and, in the same pass over the validation set,
the steadiness figure: each watched layer's mean over neurons of its intra-class response variance
(nsr/train/steadiness.py, the figure of `python -m nsr analyze`). The regularized layers are
watched, and for MLPs every Linear layer (each hidden layer and the output); a vanilla run watches
the layers its config names, so vanilla and NSR curves compare layer for layer.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from models import is_mlp

from .steadiness import ClassMoments, responses

PREFIX = "intra_var_"  # history column of a layer's figure: intra_var_out, intra_var_fc1, ...


def watched_layers(model: nn.Module, layers: list[str], model_name: str) -> list[str]:
    """The config's NSR layers that the model has (a vanilla run's config may name others; they
    are only measured), then for MLPs every Linear layer, in model order, each once."""
    modules = dict(model.named_modules())
    names = [n for n in layers if n in modules]
    if is_mlp(model_name):
        names += [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return list(dict.fromkeys(names))


class SteadinessProbe:
    """Forward hooks on the watched layers while (and only while) a split is evaluated: training
    steps run without them, so they cost nothing there."""

    def __init__(self, model: nn.Module, layers: list[str], num_classes: int):
        modules = dict(model.named_modules())
        self.modules = {name: modules[name] for name in layers}
        self.num_classes = num_classes

    @contextlib.contextmanager
    def capture(self):
        outputs: dict[str, torch.Tensor] = {}
        moments = {name: ClassMoments(self.num_classes) for name in self.modules}

        def update(labels: torch.Tensor) -> None:
            for name, m in moments.items():
                m.update(responses(outputs[name], torch.float32), labels)

        hooks = [module.register_forward_hook(lambda mod, i, o, name=name: outputs.__setitem__(name, o))
                 for name, module in self.modules.items()]
        try:
            yield update, moments
        finally:
            for hook in hooks:
                hook.remove()

    @staticmethod
    def figures(moments: dict[str, ClassMoments]) -> dict[str, float]:
        """{intra_var_<layer>: mean over neurons of sum_c (n_c/N) Var_c}, over every rank's samples."""
        result = {}
        for name, m in moments.items():
            m.all_reduce()
            result[PREFIX + name] = float(m.intra().mean())
        return result


@torch.no_grad()
def evaluate(trainer, batches, probe: SteadinessProbe | None = None) -> tuple[float, float, dict]:
    """(top-1, top-5 accuracy in percent, steadiness figures) over `batches`, summed over all
    ranks; the figures are {} without a probe."""
    model, rt = trainer.model, trainer.rt
    if rt.world > 1:
        # DDP keeps parameters equal, but BatchNorm running stats only as of the last forward:
        # every rank evaluates (and rank 0 saves) with rank 0's.
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=rt.device)  # top1, top5, count
    k = min(5, trainer.data.num_classes)
    with probe.capture() if probe is not None else contextlib.nullcontext((None, {})) as (update, moments):
        for xb, yb in batches.iterate(0):
            if trainer.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with trainer.autocast():
                logits = model(xb)
            hits = logits.topk(k, dim=1).indices == yb[:, None]
            totals[0] += hits[:, 0].sum()
            totals[1] += hits.any(dim=1).sum()
            totals[2] += yb.shape[0]
            if update is not None:
                update(yb)
    if rt.world > 1:
        dist.all_reduce(totals)
    model.train(was_training)
    top1, top5, count = totals.tolist()
    figures = SteadinessProbe.figures(moments) if moments else {}
    return 100.0 * top1 / max(count, 1.0), 100.0 * top5 / max(count, 1.0), figures
