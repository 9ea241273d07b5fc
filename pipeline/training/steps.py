"""How one optimization step runs: eagerly (the CPU's way), or on fixed buffers replayed as a CUDA graph.

Why two: on a CPU a step's time is its arithmetic, and the plain eager step is the fastest. On a GPU the
IDM's step (a 3-layer MLP on 512 rows) is bound by kernel launches and Python, not by the card (README
"Speed": the eager step used a small fraction of an H200's matmul peak). A CUDA graph replays all of
a step's kernels with one launch. For that, every tensor the step reads or writes must sit at a fixed
address on the device: the batch (gathered through a device permutation at a device position), the
learning rate (a tensor the step computes from a device step counter, read by AdamW with
capturable=True), the decay of the weight average, and the running loss sum. The epoch's last, partial
batch is padded with rows of weight 0, so every step has one shape and its loss is still the mean over
its real rows.

`GraphStep` runs uncaptured on a CPU: the tests compare it there with `EagerStep` (same batches, same
updates up to float rounding), which is what makes the captured graph's arithmetic trustworthy.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import torch
import torch.nn.functional as F

WARMUP_STEPS = 3  # eager steps on a side stream before capture (lazy optimizer state, cuBLAS workspaces)


class WeightAverage:
    """Exponential moving average of the weights (Polyak averaging), for one foreach lerp per step.

    Where a model overfits, the average of the recent weights generalizes better than the weights of any
    one step (walker2d in bench/quality_vs_recipe.md); where it does not, it changes nothing.
    `swapped()` puts the average into the net (to validate or keep it) and the raw weights back
    afterwards.
    """

    def __init__(self, net, decay: float):
        self.decay, self.updates = decay, 0
        self.raw = [p.detach() for p in net.parameters()]
        self.avg = [p.clone() for p in self.raw]

    @staticmethod
    def warmed_decay(decay, updates):
        """The decay after `updates` updates: a short warm-up (no bias towards the initial weights)."""
        return min(decay, (1 + updates) / (10 + updates))

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        torch._foreach_lerp_(self.avg, self.raw, 1.0 - self.warmed_decay(self.decay, self.updates))

    @torch.no_grad()
    def update_on_device(self, updates: torch.Tensor) -> None:
        """`update` with the count as a device tensor, so a CUDA graph can capture it (no host value)."""
        weight = 1.0 - ((1 + updates) / (10 + updates)).clamp(max=self.decay)
        step = torch._foreach_sub(self.raw, self.avg)
        torch._foreach_mul_(
            step, weight
        )  # the Tensor overload; _foreach_lerp_ would read the weight on the host
        torch._foreach_add_(self.avg, step)

    @contextlib.contextmanager
    def swapped(self):
        saved = [p.clone() for p in self.raw]
        torch._foreach_copy_(self.raw, self.avg)
        try:
            yield
        finally:
            torch._foreach_copy_(self.raw, saved)


def make_optimizer(config, net, lr=None, capturable: bool = False):
    """Adam / AdamW as `config` says, the fused kernel where there is one (fewer launches than foreach).

    `lr` may be a device tensor (the graph step's); `capturable` keeps the step count on the device too."""
    opt_cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    kwargs = {"lr": config.lr if lr is None else lr, "weight_decay": config.weight_decay}
    if capturable:
        kwargs["capturable"] = True
    try:
        return opt_cls(net.parameters(), fused=True, **kwargs)
    except (
        RuntimeError,
        TypeError,
    ):  # no fused kernel for this device / build (foreach takes a tensor LR if capturable)
        return opt_cls(net.parameters(), **kwargs)


def build_optimizer(config, net, total_steps: int):
    """(optimizer, scheduler or None) for the eager step: cosine over all the steps, as CosineAnnealingLR."""
    opt = make_optimizer(config, net)
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
        if config.schedule == "cosine"
        else None
    )
    return opt, sched


class InputNoise:
    """Training-only noise on the inputs: s + obs_noise · ε and s' + target_noise · ε (normalized units, i.e.
    dataset stds: what a planner's noisy plan and a state a little off look like to the net). Off (both 0)
    it returns the tensors as they are, so the default step's arithmetic is untouched.

    The draws come from a generator per member seeded by its config's seed, so a population member meets
    the very noise its alone-training meets (inputs (K, rows, dim): member k draws its own (rows, dim)).
    A short last batch draws a whole batch and uses its first rows, as the fixed-buffer step does with its
    padded batch, so the eager and graph steps meet the same noise. Under CUDA-graph capture
    (`shared_generator`) the default generator draws, which capture supports."""

    def __init__(self, configs, device, shared_generator: bool = False):
        configs = configs if isinstance(configs, (list, tuple)) else [configs]
        self.obs, self.target = float(configs[0].obs_noise), float(configs[0].target_noise)
        self.batch = int(configs[0].batch_size)
        self.gens = None
        if (self.obs > 0 or self.target > 0) and not shared_generator:
            self.gens = [torch.Generator(device=device).manual_seed(NOISE_SEED + c.seed) for c in configs]

    def keep(self, rows: list[int]) -> None:
        """Members at `rows` go on (the others left the stack)."""
        if self.gens is not None:
            self.gens = [self.gens[r] for r in rows]

    def _draw(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        if self.gens is None:
            return x + scale * torch.randn_like(x)
        rows, dim = x.shape[-2:]
        shape = (max(rows, self.batch), dim)
        draws = [torch.randn(shape, generator=g, device=x.device, dtype=x.dtype)[:rows] for g in self.gens]
        eps = draws[0] if x.dim() == 2 else torch.stack(draws)
        return x + scale * eps

    def __call__(self, obs: torch.Tensor, nxt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.obs > 0:
            obs = self._draw(obs, self.obs)
        if self.target > 0:
            nxt = self._draw(nxt, self.target)
        return obs, nxt


#: offset of the input-noise generators' seeds from the config's seed (another stream than the init's)
NOISE_SEED = 0x5EED_0000


class _LossSum:
    """The training loss summed on the device (no per-step sync) and read back only at evaluations."""

    def __init__(self, device):
        self.sum, self.count = torch.zeros((), device=device), 0

    def take_mean(self) -> float:
        value = float(self.sum) / max(self.count, 1)
        self.sum.zero_()  # in place: a captured graph keeps adding into this tensor
        self.count = 0
        return value


class EagerStep:
    """The plain step: slice the epoch's permutation, forward, backward, fused AdamW, average, schedule."""

    captured = False

    def __init__(self, net, data, config, total_steps, autocast, average: WeightAverage | None):
        self.net, self.data, self.batch, self.autocast, self.average = (
            net,
            data,
            config.batch_size,
            autocast,
            average,
        )
        self.opt, self.sched = build_optimizer(config, net, total_steps)
        self.loss_fn = F.huber_loss if config.loss == "huber" else F.mse_loss
        self.loss = _LossSum(data.act.device)
        self.perm = None
        self.noise = InputNoise(config, data.act.device)

    def begin_epoch(self, perm: torch.Tensor) -> None:
        self.perm = perm

    def __call__(self, k: int) -> None:
        rows = self.perm[k * self.batch : (k + 1) * self.batch]
        obs, nxt = self.noise(self.data.obs[rows], self.data.next_obs[rows])
        with self.autocast:
            pred = self.net(obs, nxt)
        loss = self.loss_fn(pred.float(), self.data.act[rows])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.average is not None:
            self.average.update()
        if self.sched is not None:
            self.sched.step()
        self.loss.sum += loss.detach()
        self.loss.count += 1


class GraphStep:
    """The step on fixed device buffers; on CUDA captured once (after WARMUP_STEPS eager steps) and replayed.

    If the capture fails (an op this torch build cannot capture), training goes on with the same step
    uncaptured and a warning; `captured` says which ran.
    """

    def __init__(self, net, data, config, total_steps, precision, average: WeightAverage | None):
        device = data.act.device
        self.net, self.data, self.average = net, data, average
        self.batch = config.batch_size
        self.n_train = int(data.train_idx.shape[0])
        padded = math.ceil(self.n_train / self.batch) * self.batch
        self.perm = torch.zeros(padded, dtype=torch.long, device=device)  # padding rows: row 0 at weight 0
        self.weight = torch.zeros(padded, device=device)
        self.weight[: self.n_train] = 1.0
        self.offsets = torch.arange(self.batch, device=device)
        self.pos = torch.zeros((), dtype=torch.long, device=device)  # first row of the next batch in `perm`
        self.done = torch.zeros(
            (), device=device
        )  # optimizer steps taken: drives the schedule and the average
        self.base_lr, self.total_steps, self.cosine = (
            float(config.lr),
            total_steps,
            config.schedule == "cosine",
        )
        self.lr = torch.tensor(self.base_lr, device=device)
        self.huber = config.loss == "huber"
        # cache_enabled=False: autocast's cast cache must not outlive a capture (torch.cuda.graphs notes)
        self.autocast = torch.autocast(
            device.type, dtype=torch.bfloat16, enabled=precision == "bf16", cache_enabled=False
        )
        self.opt = make_optimizer(config, net, lr=self.lr, capturable=device.type == "cuda")
        self.loss = _LossSum(device)
        self.capture = device.type == "cuda"
        self.graph, self.eager_steps, self.captured = None, 0, False
        self.noise = InputNoise(config, device, shared_generator=self.capture)

    def begin_epoch(self, perm: torch.Tensor) -> None:
        self.perm[: self.n_train].copy_(perm)
        self.pos.zero_()

    def __call__(self, k: int) -> None:  # k is unused: the position lives on the device
        if self.graph is not None:
            self.graph.replay()
        elif self.capture and self.eager_steps >= WARMUP_STEPS:
            self._capture()
        elif self.capture:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._run()
            torch.cuda.current_stream().wait_stream(side)
            self.eager_steps += 1
        else:
            self._run()
        self.loss.count += 1

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: Ray's other threads may touch CUDA meanwhile; only this thread must not
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._run()
        except RuntimeError as e:  # nothing ran during the failed capture: take this step uncaptured
            warnings.warn(
                f"CUDA graph capture of the training step failed, training without it: {e}", stacklevel=2
            )
            self.capture = False
            torch.cuda.synchronize()
            self._run()
            return
        self.graph, self.captured = graph, True
        graph.replay()  # capturing records the step without running it

    def _run(self) -> None:
        """One step; every tensor it touches outlives it, so its kernels can be replayed as they are."""
        at = self.offsets + self.pos
        rows, weight = self.perm.index_select(0, at), self.weight.index_select(0, at)
        if self.cosine:  # CosineAnnealingLR's closed form, at the step about to be taken
            self.lr.copy_((torch.cos(self.done * (math.pi / self.total_steps)) + 1) * (0.5 * self.base_lr))
        self.opt.zero_grad(
            set_to_none=True
        )  # under capture: backward writes fresh gradients, as the graph replays
        obs, nxt = self.noise(self.data.obs.index_select(0, rows), self.data.next_obs.index_select(0, rows))
        with self.autocast:
            pred = self.net(obs, nxt)
        target = self.data.act.index_select(0, rows)
        if self.huber:
            per_row = F.huber_loss(pred.float(), target, reduction="none").mean(1)
        else:
            per_row = (pred.float() - target).square().mean(1)
        loss = (per_row * weight).sum() / weight.sum()
        loss.backward()
        self.opt.step()
        if self.average is not None:
            self.average.update_on_device(self.done + 1)
        self.loss.sum += loss.detach()
        self.done += 1
        self.pos += self.batch
