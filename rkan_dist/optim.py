"""Optimizers, loss with mixed targets, mixup/cutmix and the EMA of weights.

Randomness here (which batches are mixed, the mixing coefficient, the cutmix box) comes from a
generator seeded by (seed, rank, epoch, batch), so a resumed run mixes exactly as the
uninterrupted run would, without saving generator state.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from rkan_dist.config import OptimConfig


def parameter_groups(model: nn.Module, weight_decay: float, no_decay_bn_bias: bool) -> list[dict]:
    """Two groups: weights that decay, and (optionally) BatchNorm parameters and biases that do not.

    One-dimensional parameters are exactly the norm scales/shifts and the biases here; the KAN
    functions' small tensors (base_weight, poly_weight, scaler) are 2-3 dimensional and decay.
    """
    decay, no_decay = [], []
    for _, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if no_decay_bn_bias and parameter.ndim <= 1 else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al., 2019): Adam moments with a per-tensor trust ratio ||w|| / ||update||,
    for very large global batches where SGD's linear lr scaling stops working."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                step = float(state["step"])
                grad = p.grad.float()
                state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                m_hat = state["exp_avg"] / (1 - beta1**step)
                v_hat = state["exp_avg_sq"] / (1 - beta2**step)
                update = m_hat / (v_hat.sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(p.float(), alpha=group["weight_decay"])
                weight_norm, update_norm = p.float().norm(), update.norm()
                trust = torch.where((weight_norm > 0) & (update_norm > 0), weight_norm / update_norm, torch.ones(()))
                p.add_((update * trust).to(p.dtype), alpha=-group["lr"])
        return loss


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    """The lr set here is a placeholder: the schedule sets it before every step."""
    groups = parameter_groups(model, config.weight_decay, config.no_decay_bn_bias)
    # torch's fused kernels update each parameter in one pass, without the temporaries of the
    # per-tensor path (docs/MEASURED.md has the figure).
    fused = all(param.is_floating_point() and param.device.type in ("cpu", "cuda")
                for group in groups for param in group["params"])
    if config.name == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                               nesterov=config.nesterov and config.momentum > 0, fused=fused)
    if config.name == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps, fused=fused)
    if config.name == "lamb":
        return Lamb(groups, lr=config.lr, betas=config.betas, eps=config.eps)
    raise ValueError(f"unknown optimizer {config.name!r}; choose one of sgd, adamw, lamb")


def align_state_to_parameters(optimizer: torch.optim.Optimizer) -> int:
    """Give every optimizer state tensor shaped like its parameter that parameter's dtype, device and
    strides; returns how many it copied. Call it right after `optimizer.load_state_dict`.

    torch's load moves state to the parameter's device and dtype
    (`Optimizer._process_value_according_to_param_policy`) but keeps the strides it was saved with,
    and the trainer's weights are channels_last on CUDA and NCHW on CPU. The fused CUDA SGD/AdamW
    kernels refuse parameters, gradients and state of unequal strides; the fused CPU kernel walks
    raw memory and silently pairs each weight with another weight's momentum. The copy keeps every
    value exactly: only the layout changes (and the dtype where torch's load would have cast it).

    'step' keeps torch's own rule (float32 on the parameter's device for fused and capturable
    groups, as saved otherwise), which its load has applied already. State of another shape than
    its parameter (none in torch's SGD/AdamW; DeepSpeed ZeRO's flat partitions are themselves the
    parameters their state is shaped like) is left as it is.
    """
    copied = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param)
            if not state:
                continue
            for key, value in state.items():
                if key == "step" or not isinstance(value, torch.Tensor) or value.shape != param.shape:
                    continue
                dtype = param.dtype if param.is_floating_point() else value.dtype  # torch's load rule
                if (value.dtype, value.device, value.stride()) == (dtype, param.device, param.stride()):
                    continue
                # a dense parameter's strides exactly (preserve_format), as fresh state's zeros_like has them
                state[key] = torch.empty_like(param, dtype=dtype).copy_(value)
                copied += 1
    return copied


def mix_generator(seed: int, rank: int, epoch: int, batch: int) -> torch.Generator:
    """A generator whose draws depend only on (seed, rank, epoch, batch): resume-exact, no saved state."""
    import numpy as np

    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(np.random.SeedSequence([seed, rank, epoch, batch]).generate_state(1, np.uint64)[0] >> 1))
    return generator


def mix_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    mixup_alpha: float,
    cutmix_alpha: float,
    mix_prob: float,
    label_smoothing: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or cutmix on the device, returning images and soft targets (label smoothing included).

    When both are on, each mixed batch uses one of them with equal chance (as timm does). The
    partner of sample i is sample i of the batch flipped, so no extra permutation is drawn.
    """
    off = label_smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, device=images.device, dtype=torch.float32)
    targets.scatter_(1, labels.view(-1, 1), 1.0 - label_smoothing + off)
    if (mixup_alpha <= 0 and cutmix_alpha <= 0) or float(torch.rand((), generator=generator)) >= mix_prob:
        return images, targets
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or float(torch.rand((), generator=generator)) < 0.5)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = _beta(alpha, generator)
    partner_images, partner_targets = images.flip(0), targets.flip(0)
    if use_cutmix:
        height, width = images.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        box_h, box_w = int(height * cut), int(width * cut)
        cy = int(torch.randint(height, (), generator=generator))
        cx = int(torch.randint(width, (), generator=generator))
        y0, y1 = max(cy - box_h // 2, 0), min(cy + box_h // 2, height)
        x0, x1 = max(cx - box_w // 2, 0), min(cx + box_w // 2, width)
        images = images.clone()
        images[..., y0:y1, x0:x1] = partner_images[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)  # the area actually pasted
    else:
        images = images * lam + partner_images * (1.0 - lam)
    return images, targets * lam + partner_targets * (1.0 - lam)


def _beta(alpha: float, generator: torch.Generator) -> float:
    """Beta(alpha, alpha) from two Gamma draws made with `generator` (torch's Beta takes none)."""
    x = torch._standard_gamma(torch.tensor([alpha, alpha], dtype=torch.float64), generator=generator)
    return float(x[0] / x.sum())


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=1), dim=1).mean()


class ModelEma:
    """Exponential moving average of a model's weights (fp32), evaluated alongside the model.

    Buffers (BatchNorm running statistics) are copied, not averaged, as timm's ModelEmaV2 does.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).float().eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema += (1 - decay) * (model - ema) as one foreach pass, buffers copied in another.

        `model` is the module this EMA was made from (same parameters, same order). A mul_ and an
        add_ per tensor were two small kernels each, ~640 launches per step for ResNet-50 on CUDA;
        the foreach ops launch a few fused kernels for all of them.
        """
        averages, buffers = list(self.module.parameters()), list(self.module.buffers())
        sources = [p.detach() for p in model.parameters()]
        if len(sources) != len(averages):
            raise ValueError(f"ModelEma.update: the model has {len(sources)} parameters, the EMA {len(averages)}")
        # bf16 parameters (DeepSpeed's) are averaged in the EMA's fp32
        sources = [s if (s.dtype, s.device) == (a.dtype, a.device) else s.to(a.device, a.dtype)
                   for s, a in zip(sources, averages)]
        torch._foreach_lerp_(averages, sources, 1.0 - self.decay)
        if buffers:
            torch._foreach_copy_(buffers, [b.detach() for b in model.buffers()])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
