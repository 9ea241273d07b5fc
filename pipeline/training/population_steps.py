"""K nets of one shape stacked into one: batched layers over (K, ...) weights, and the population's steps.

Why batched matmuls and not `torch.func.vmap`: on this CPU vmap ignored bf16 autocast (the whole forward
ran in fp32) and cost more per member than the plain net; `torch.baddbmm` over a (K, out, in) weight runs
under autocast like `F.linear` does, and is one kernel for all members. Each member keeps torch's own
optimizer (the fused AdamW the single trainer makes, with its lr and weight decay) over *views* of the
stacked weights, so its update is the single trainer's arithmetic, not an imitation of it.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from invdyn.models import _RunningScale
from pipeline.training.config import TrainConfigError
from pipeline.training.steps import GraphStep, InputNoise, build_optimizer, make_optimizer


class StackedLinear(nn.Module):
    """K Linear layers: weight stored (K, in, out), bias (K, out); input (K, rows, in). `fp32_input` runs it
    outside autocast, as `machine.fp32_input_layer` does for a single net's first layer.

    Why (in, out) and not Linear's (out, in): the batched matmul's gradient comes out in this layout, so
    autograd hands it over as it is instead of copying it into the parameter's layout at every step.
    `member_state` transposes it back."""

    def __init__(self, layers: list[nn.Linear]):
        super().__init__()
        self.weight = nn.Parameter(torch.stack([m.weight.detach().t() for m in layers]).contiguous())
        self.bias = nn.Parameter(torch.stack([m.bias.detach() for m in layers]))
        self.fp32_input = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp32_input and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return torch.baddbmm(self.bias.unsqueeze(1), x.float(), self.weight)
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight)


class _MemberLayerNorm(torch.autograd.Function):
    """LayerNorm of each member with its own affine, by the very kernels a single net's LayerNorm runs
    (forward and backward fused, weight and bias gradients included): the same numbers as alone, and
    fewer passes over the activations than a plain normalize-then-scale (measured on this CPU)."""

    @staticmethod
    def forward(ctx, x, weight, bias, shape, eps):
        parts = [torch.native_layer_norm(x[k], shape, weight[k], bias[k], eps) for k in range(x.shape[0])]
        out, mean, rstd = (torch.stack(p) for p in zip(*parts, strict=True))
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.shape = shape
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])
        parts = [
            torch.ops.aten.native_layer_norm_backward(
                grad[k], x[k], ctx.shape, mean[k], rstd[k], weight[k], bias[k], mask
            )
            for k in range(x.shape[0])
        ]
        grads = [torch.stack(p) if p[0] is not None else None for p in zip(*parts, strict=True)]
        return (*grads, None, None)


class StackedLayerNorm(nn.Module):
    """K LayerNorms over the last dimension, each with its own affine weight and bias."""

    def __init__(self, layers: list[nn.LayerNorm]):
        super().__init__()
        self.shape, self.eps = list(layers[0].normalized_shape), layers[0].eps
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in layers]))
        self.bias = nn.Parameter(torch.stack([m.bias.detach() for m in layers]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _MemberLayerNorm.apply(x, self.weight, self.bias, self.shape, self.eps)


class MemberDropout(nn.Module):
    """Dropout with each member's own rate (0 for a member without dropout: then an exact identity)."""

    def __init__(self, rates: list[float]):
        super().__init__()
        rate = torch.tensor(rates, dtype=torch.float32).view(-1, 1, 1)
        self.register_buffer("rate", rate, persistent=False)  # not a weight: no state-dict entry

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = (torch.rand_like(x, dtype=torch.float32) >= self.rate).to(x.dtype)
        return x * keep / (1.0 - self.rate).to(x.dtype)


class StackedRunningScale(nn.Module):
    """`invdyn.models._RunningScale` per member: its own running RMS of its own batches."""

    def __init__(self, layers: list[_RunningScale]):
        super().__init__()
        self.eps = layers[0].eps
        self.register_buffer("sq_mean", torch.stack([m.sq_mean for m in layers]))
        self.register_buffer("count", torch.stack([m.count for m in layers]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                n = float(x.shape[1])
                batch = x.detach().float().pow(2).mean(1)
                count = self.count.unsqueeze(1)
                self.sq_mean.copy_((self.sq_mean * count + batch * n) / (count + n))
                self.count.add_(n)
        return x * torch.rsqrt(self.sq_mean.unsqueeze(1) + self.eps).to(x.dtype)


def stack_nets(nets: list[nn.Module], dropouts: list[float], fp32_input: bool) -> nn.Module:
    """One net whose every weight is the members' weights stacked on a new first dimension.

    The net's own forward runs unchanged (it only concatenates on the last dimension and scales), and the
    parameter and buffer names are the single net's, so member k's state dict is `{name: t[k]}`."""
    # the template is a member with the highest dropout: a net built without dropout has no Dropout layer
    # (nn.Identity) where the others need their MemberDropout
    stacked = copy.deepcopy(nets[max(range(len(nets)), key=lambda i: dropouts[i])])
    # the net's own buffers (delta_input's s' - s statistics) stay one copy that every member shares: they
    # come from the training rows, which one group shares
    for name, buf in stacked.named_buffers(recurse=False):
        if any(not torch.equal(buf, net.get_buffer(name)) for net in nets):
            raise TrainConfigError(f"population members differ in {name!r}; they must share data and split")
    kinds = {nn.Linear: StackedLinear, nn.LayerNorm: StackedLayerNorm, _RunningScale: StackedRunningScale}
    for name, module in list(stacked.named_modules()):
        if not name:
            continue
        if type(module) in kinds:
            new = kinds[type(module)]([net.get_submodule(name) for net in nets])
        elif isinstance(module, nn.Dropout):
            new = MemberDropout(dropouts)
        elif any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(False)):
            raise TrainConfigError(
                f"{type(nets[0]).__name__} holds a {type(module).__name__} layer ({name}) that population "
                "training cannot stack; train this architecture without --population"
            )
        else:
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(stacked.get_submodule(parent) if parent else stacked, leaf, new)
    first = next((m for m in stacked.modules() if isinstance(m, StackedLinear)), None)
    if first is not None:
        first.fp32_input = fp32_input
    return stacked.train()


def member_state(net: nn.Module, k: int, params: list[torch.Tensor] | None = None) -> dict:
    """Member k's state dict (cloned, in the single net's layout), optionally with `params` (e.g. the
    weight average) as its weights."""
    names = [name for name, _ in net.named_parameters()]
    shared = {name for name, _ in net.named_buffers(recurse=False)}  # not stacked (stack_nets)
    state = {name: t.detach() if name in shared else t.detach()[k] for name, t in net.state_dict().items()}
    for name, tensor in zip(names, params or [], strict=False):
        state[name] = tensor[k]
    for name, module in net.named_modules():
        if isinstance(module, StackedLinear):
            key = f"{name}.weight" if name else "weight"
            state[key] = state[key].t()
    return {name: t.contiguous().clone() for name, t in state.items()}


class _MemberLoss:
    """Each member's training loss summed on the device, read back only at its evaluations."""

    def __init__(self, members: int, device):
        self.sum, self.count = torch.zeros(members, device=device), 0
        self.counts = [0] * members

    def take_means(self, rows: list[int]) -> list[float]:
        sums = self.sum.tolist()
        for r in range(len(self.counts)):
            self.counts[r] += self.count
        self.count = 0
        means = [sums[r] / max(self.counts[r], 1) for r in rows]
        for r in rows:
            self.sum[r] = 0.0  # in place: a captured graph keeps adding into this tensor
            self.counts[r] = 0
        return means


class _Stack:
    """The stacked net, its weight average and one torch optimizer per member over views of the stack."""

    def __init__(self, nets, configs, totals, precision, *, lr=None, capturable=False):
        device = next(nets[0].parameters()).device
        dropouts = [float(c.dropout) for c in configs]
        fp32_input = precision == "bf16" and configs[0].fp32_input_layer
        self.net = stack_nets(nets, dropouts, fp32_input).to(device)
        self.params = list(self.net.parameters())
        self.avg = [p.detach().clone() for p in self.params]
        for p in self.params:
            p.grad = torch.zeros_like(p)  # the graph step zeroes it in place: the views point into it
        self.views = [[nn.Parameter(p.detach()[k]) for p in self.params] for k in range(len(nets))]
        self.opts, self.scheds = [], []
        for k, (config, views) in enumerate(zip(configs, self.views, strict=True)):
            holder = SimpleNamespace(parameters=lambda views=views: views)
            if lr is None:
                opt, sched = build_optimizer(config, holder, totals[k])
            else:
                opt, sched = make_optimizer(config, holder, lr=lr[k], capturable=capturable), None
            self.opts.append(opt)
            self.scheds.append(sched)
        self.point_grads()
        self.decay = [float(c.ema) for c in configs]
        self.huber = [c.loss == "huber" for c in configs]

    def point_grads(self) -> None:
        for k, views in enumerate(self.views):
            for view, p in zip(views, self.params, strict=True):
                view.grad = p.grad[k]

    def keep(self, rows: list[int]) -> None:
        """Keep only the members at `rows` of the stack (the eager step drops members that stopped)."""
        index = torch.tensor(rows, dtype=torch.long, device=self.params[0].device)
        with torch.no_grad():
            for p in self.params:
                p.data = p.data.index_select(0, index)
                p.grad = torch.zeros_like(p)
            self.avg = [a.index_select(0, index) for a in self.avg]
            for module in list(self.net.modules())[1:]:  # the net's own buffers are shared, not stacked
                for name, buf in list(module.named_buffers(recurse=False)):
                    setattr(module, name, buf.index_select(0, index))
        self.views = [self.views[r] for r in rows]
        for k, views in enumerate(self.views):
            for view, p in zip(views, self.params, strict=True):
                view.data = p.data[k]
        self.point_grads()
        self.opts = [self.opts[r] for r in rows]
        self.scheds = [self.scheds[r] for r in rows]
        self.decay = [self.decay[r] for r in rows]
        self.huber = [self.huber[r] for r in rows]

    def losses(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(K, rows) loss per row: each member's MSE or Huber loss over the action dimensions."""
        per_row = (pred.float() - target).square().mean(2)
        if any(self.huber):
            huber = F.huber_loss(pred.float(), target, reduction="none").mean(2)
            flags = torch.tensor(self.huber, device=pred.device).unsqueeze(1)
            per_row = torch.where(flags, huber, per_row)
        return per_row

    @torch.no_grad()
    def average(self, weight: torch.Tensor) -> None:
        """avg <- lerp(avg, raw, weight) per member; weight 1 (no average) gives the raw weights exactly."""
        for a, p in zip(self.avg, self.params, strict=True):
            a.lerp_(p.detach(), weight.view(-1, *[1] * (a.dim() - 1)))


class PopulationEagerStep:
    """The eager step for K members: one batched forward and backward, then each member's own optimizer,
    schedule and weight average. Members that stop leave the stack (`keep`), so they cost nothing."""

    captured = False

    def __init__(self, nets, data, configs, totals, autocast, precision):
        self.data, self.batch, self.autocast = data, configs[0].batch_size, autocast
        self.stack = _Stack(nets, configs, totals, precision)
        self.loss = _MemberLoss(len(nets), data.act.device)
        self.updates, self.perm = 0, None
        self.noise = InputNoise(configs, data.act.device)  # one generator per member

    def begin_epoch(self, perm: torch.Tensor) -> None:
        self.perm = perm  # (members, n_train): each member's own permutation

    def keep(self, rows: list[int]) -> None:
        self.stack.keep(rows)
        self.noise.keep(rows)
        self.perm = self.perm[rows] if self.perm is not None else None
        self.loss.sum = self.loss.sum[rows].clone()
        self.loss.counts = [self.loss.counts[r] for r in rows]

    def __call__(self, k: int) -> None:
        stack = self.stack
        rows = self.perm[:, k * self.batch : (k + 1) * self.batch]
        obs, nxt = self.noise(self.data.obs[rows], self.data.next_obs[rows])
        with self.autocast:
            pred = stack.net(obs, nxt)
        per_member = stack.losses(pred, self.data.act[rows]).mean(1)
        for p in stack.params:
            p.grad = None  # autograd then hands over the fresh gradient, no zeroing and adding
        per_member.sum().backward()
        stack.point_grads()
        for opt in stack.opts:
            opt.step()
        self.updates += 1
        u = self.updates  # WeightAverage.warmed_decay, in float64 like the single step's host scalar
        weight = [1.0 - min(d, (1 + u) / (10 + u)) if d else 1.0 for d in stack.decay]
        stack.average(torch.tensor(weight, device=pred.device))
        for sched in stack.scheds:
            if sched is not None:
                sched.step()
        self.loss.sum += per_member.detach()
        self.loss.count += 1


class PopulationGraphStep(GraphStep):
    """`GraphStep` for K members: every tensor at a fixed address, so one CUDA graph replay advances every
    member. Stopped members stay in the stack with learning rate and average weight 0 (masked)."""

    def __init__(self, nets, data, configs, totals, precision):
        device = data.act.device
        k = len(nets)
        self.data, self.batch = data, configs[0].batch_size
        self.n_train = int(data.train_idx.shape[0])
        padded = math.ceil(self.n_train / self.batch) * self.batch
        self.perm = torch.zeros(k, padded, dtype=torch.long, device=device)
        self.weight = torch.zeros(padded, device=device)
        self.weight[: self.n_train] = 1.0
        self.offsets = torch.arange(self.batch, device=device)
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.done = torch.zeros((), device=device)
        self.active = torch.ones(k, device=device)
        self.base_lr = torch.tensor([float(c.lr) for c in configs], device=device)
        self.total = torch.tensor([float(t) for t in totals], device=device)
        self.cosine = torch.tensor([c.schedule == "cosine" for c in configs], device=device)
        self.lr_all = self.base_lr.clone()
        self.lrs = [torch.tensor(float(c.lr), device=device) for c in configs]
        self.decay = torch.tensor([float(c.ema) for c in configs], device=device)
        self.autocast = torch.autocast(
            device.type, dtype=torch.bfloat16, enabled=precision == "bf16", cache_enabled=False
        )
        capturable = device.type == "cuda"
        self.stack = _Stack(nets, configs, totals, precision, lr=self.lrs, capturable=capturable)
        self.loss = _MemberLoss(k, device)
        self.capture = capturable
        self.graph, self.eager_steps, self.captured = None, 0, False
        self.noise = InputNoise(configs, device, shared_generator=capturable)

    def begin_epoch(self, perm: torch.Tensor) -> None:
        self.perm[:, : self.n_train].copy_(perm)
        self.pos.zero_()

    def freeze(self, rows: list[int]) -> None:
        """Members at `rows` stop: learning rate 0 and average weight 0 leave their weights as they are."""
        self.active[rows] = 0.0

    def _run(self) -> None:
        """One step of every member; no host reads, every tensor outlives it (capturable)."""
        stack, data, k = self.stack, self.data, self.perm.shape[0]
        at = self.offsets + self.pos
        rows, weight = self.perm.index_select(1, at).reshape(-1), self.weight.index_select(0, at)
        cosine = (torch.cos(self.done * math.pi / self.total) + 1) * 0.5
        self.lr_all.copy_(torch.where(self.cosine, cosine, 1.0) * self.base_lr * self.active)
        torch._foreach_copy_(self.lrs, list(self.lr_all.unbind(0)))
        torch._foreach_zero_([p.grad for p in stack.params])
        with self.autocast:
            obs = data.obs.index_select(0, rows).view(k, self.batch, -1)
            nxt = data.next_obs.index_select(0, rows).view(k, self.batch, -1)
            pred = stack.net(*self.noise(obs, nxt))
        target = data.act.index_select(0, rows).view(k, self.batch, -1)
        per_member = (stack.losses(pred, target) * weight).sum(1) / weight.sum()
        per_member.sum().backward()
        for opt in stack.opts:
            opt.step()
        updates = self.done + 1
        ema = 1.0 - torch.minimum(self.decay, (1 + updates) / (10 + updates))
        stack.average(torch.where(self.decay > 0, ema, 1.0) * self.active)
        self.loss.sum += per_member.detach()
        self.done += 1
        self.pos += self.batch
