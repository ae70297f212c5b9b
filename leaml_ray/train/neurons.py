"""The QA generator's objective: selective neuron caption distillation (docs/design.md#selective-neuron-distillation).

A neuron is one intermediate unit of an MLP block: row j of gate_proj and up_proj (and element j of their biases),
column j of down_proj (with LoRA: row j of their lora_B, column j of down_proj's lora_A). `scope` says which MLP
blocks count: the language model's (lm_mlp, the paper's reading), every block including the vision tower's
(all_mlp), or none, the caption gradient then reaching every trainable parameter (full, the ablation without
selection).

The train rows are the captioned images; the labeled QA pairs reach every worker whole (they are few by
construction) and `QASchedule` picks each micro batch's pairs: every pair once per pass, in a fresh seeded order
each pass, whatever the number of captions. Before training, every rank accumulates |dL_QA/dW| per neuron over a
few labeled batches; the scores are all-reduced so all ranks select the same top `neuron_ratio` per layer. Each
micro batch then runs two backward passes inside one DeepSpeed accumulation window: L_QA unrestricted, then
lambda * L_cap through gradient hooks that zero every gradient except the selected neurons' rows/columns. With
`caption_distill=False` (the ablation) the same QA batches train alone.
"""

from __future__ import annotations

import re
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from leaml_ray.train.core import Objective, collective_device, encode_rows
from leaml_ray.train.job import TrainJob

QA_COLUMNS = ("image", "instruction", "response")
# where the caption gradient may go: the language model's MLP neurons (the paper's reading), the neurons of every
# MLP block (vision tower included: a weak base may lack what it needs there), or every trainable parameter
# (`full`: distillation without selection, the true ablation of selective neurons)
SCOPES = ("lm_mlp", "all_mlp", "full")
LAYER = re.compile(
    r"(.*(?:layers|blocks)\.\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.(?:(lora_[AB])\.(?:\w+\.)?)?(weight|bias)$"
)


def neuron_params(model: torch.nn.Module, scope: str) -> dict[str, list[tuple[str, torch.nn.Parameter, int]]]:
    """Trainable params that hold neurons in `scope`, by layer: (name, param, axis of the neuron index)."""
    layers: dict[str, list[tuple[str, torch.nn.Parameter, int]]] = {}
    if scope == "full":
        return layers
    for name, param in model.named_parameters():
        m = LAYER.match(name)
        if not m or not param.requires_grad or (scope == "lm_mlp" and "language_model" not in name):
            continue
        proj, lora, kind = m.group(2), m.group(3), m.group(4)
        if kind == "bias":
            if lora is not None or proj == "down_proj":
                continue  # down_proj's bias is shared by all neurons (gets no caption gradient)
            axis = 0
        elif lora is None:
            axis = 1 if proj == "down_proj" else 0
        elif (proj == "down_proj") == (lora == "lora_A"):
            axis = 1 if proj == "down_proj" else 0
        else:
            continue  # the LoRA factor shared by all neurons (gets no caption gradient)
        layers.setdefault(m.group(1), []).append((name, param, axis))
    return layers


def _neuron_mask(mask: torch.Tensor, grad: torch.Tensor, axis: int) -> torch.Tensor:
    """A layer's neuron mask shaped to broadcast over one of its parameters (rows, columns or a bias)."""
    if grad.dim() == 1:
        return mask
    return mask[:, None] if axis == 0 else mask[None, :]


def _shape(param: torch.nn.Parameter) -> torch.Size:
    return getattr(param, "ds_shape", param.shape)  # ZeRO-3 keeps the full shape here


def select_neurons(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean mask of the top `ratio` neurons of one layer (at least one); ties broken by index."""
    k = max(1, round(ratio * scores.numel()))
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[torch.argsort(scores, descending=True, stable=True)[:k]] = True
    return mask


def masks_from_scores(scores: dict[str, torch.Tensor], mode: str, ratio: float) -> dict[str, torch.Tensor]:
    """Selected neurons per layer: every neuron for the `all` ablation, else the top `ratio` by score."""
    if mode == "all":
        return {layer: torch.ones(s.numel(), dtype=torch.bool) for layer, s in scores.items()}
    return {layer: select_neurons(s, ratio) for layer, s in scores.items()}


def _neuron_reduce(grad: torch.Tensor, axis: int) -> torch.Tensor:
    if grad.dim() == 1:
        return grad.abs().float().cpu()
    return grad.abs().sum(dim=1 - axis).float().cpu()


def _check_same_on_all_ranks(masks: dict[str, torch.Tensor]) -> None:
    """Every rank must distill into the same neurons (ZeRO partitions them across ranks)."""
    if not dist.is_initialized():
        return
    flat = torch.cat([masks[k].flatten().double() for k in sorted(masks)])
    digest = torch.stack([flat.sum(), (flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64)).sum()])
    digest = digest.to(collective_device())  # nccl reduces only GPU tensors
    gathered = [torch.zeros_like(digest) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, digest)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError("neuron masks differ between ranks; refusing to train with inconsistent masks")


class QASchedule:
    """Which labeled pairs each micro batch trains on: position p of one endless sequence made of seeded random
    permutations of the n pairs (pass p // n uses permutation p // n), so every pair is seen once per pass and in
    a new order each pass. Micro batch m of rank r takes positions [(m * world + r) * batch, ... + batch): the
    ranks together consume the sequence without gaps or overlap, and a resumed run continues where it stopped."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError("no labeled pairs to schedule")
        self.n, self.seed = n, seed
        self._perms: dict[int, np.ndarray] = {}

    def positions(self, micro: int, rank: int, world: int, batch: int) -> np.ndarray:
        start = (micro * world + rank) * batch
        return np.arange(start, start + batch)

    def pairs(self, positions: np.ndarray) -> np.ndarray:
        """Pair indices at these sequence positions."""
        passes, offsets = np.divmod(positions, self.n)
        return np.array([self._perm(int(p))[o] for p, o in zip(passes, offsets, strict=True)], dtype=np.int64)

    def take(self, micro: int, rank: int, world: int, batch: int) -> np.ndarray:
        """Pair indices of one rank's micro batch."""
        return self.pairs(self.positions(micro, rank, world, batch))

    def _perm(self, p: int) -> np.ndarray:
        if p not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()  # batches span at most two passes: keep memory flat over long runs
            self._perms[p] = np.random.default_rng([self.seed, p]).permutation(self.n)
        return self._perms[p]


def pair_views(n: int, total: int, seed: int) -> np.ndarray:
    """How often each of n labeled pairs is trained on over the first `total` schedule positions."""
    schedule = QASchedule(n, seed)
    return np.bincount(schedule.pairs(np.arange(total)), minlength=n)


class NeuronDistillation(Objective):
    """L_QA on scheduled labeled pairs + lambda * L_cap on the caption rows, L_cap reaching only the selected
    neurons (or every parameter with scope `full`, or nowhere with caption_distill=False)."""

    state_name = "neurons"

    def __init__(
        self,
        score: str,
        ratio: float,
        caption_weight: float,
        score_batches: int,
        seed: int,
        scope: str,
        caption_distill: bool,
        qa_weight: float = 1.0,  # not a setting: 0 isolates the caption pass in tests and bench/gpu_smoke.py
    ):
        if scope not in SCOPES:
            raise ValueError(f"distill scope {scope!r}; one of {', '.join(SCOPES)}")
        self.scope, self.caption_distill = scope, caption_distill
        self.backward_passes = 2 if caption_distill else 1
        self.score, self.ratio, self.caption_weight = score, ratio, caption_weight
        self.score_batches, self.seed, self.qa_weight = score_batches, seed, qa_weight
        self.scores: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.labeled: dict[str, list] = {}  # column -> values, in `pair` order (plain lists: no pyarrow needed)
        self.schedule: QASchedule | None = None
        self.rank, self.world, self.batch_size = 0, 1, 1
        self.caption_pass = False
        self.restored = False  # masks came from a checkpoint (a restarted worker does not re-score)
        self.scoring_seconds = 0.0

    def param_groups(self, model: torch.nn.Module, weight_decay: float) -> list[dict]:
        if self.scope == "full" or not self.caption_distill:
            return super().param_groups(model, weight_decay)  # nothing masked (an empty group breaks ZeRO)
        # decoupled weight decay would move unselected rows between caption updates: none on neuron params
        masked = {id(p) for params in neuron_params(model, self.scope).values() for _, p, _ in params}
        trainable = [p for p in model.parameters() if p.requires_grad]
        return [
            {"params": [p for p in trainable if id(p) not in masked], "weight_decay": weight_decay},
            {"params": [p for p in trainable if id(p) in masked], "weight_decay": 0.0},
        ]

    def setup(self, engine: Any, job: TrainJob, processor: Any, labeled: Any) -> bool:
        self.batch_size = job.batch_size
        table = labeled()
        columns = table.to_pydict() if hasattr(table, "to_pydict") else dict(table or {})
        n = len(columns.get("response", []))
        if n == 0:
            raise ValueError("the QA generator's objective needs the labeled pairs (run_training's labeled_dataset)")
        # every rank must hold the pairs in the same order: the schedule indexes them
        order = sorted(range(n), key=columns["pair"].__getitem__) if "pair" in columns else range(n)
        self.labeled = {k: [v[i] for i in order] for k, v in columns.items()}
        if dist.is_initialized():
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.schedule = QASchedule(n, self.seed)
        if self.scope == "full" or not self.caption_distill:
            return False  # nothing to score or mask (full: the caption gradient reaches every parameter)
        layers = neuron_params(engine.module, self.scope)
        if not layers:
            raise ValueError("no MLP neuron parameters found to distill into (gate_proj/up_proj/down_proj)")
        scored = False
        if not self.masks:
            self.scores = self._score(engine, layers, processor)
            self.masks = masks_from_scores(self.scores, self.score, self.ratio)
            scored = True
        _check_same_on_all_ranks(self.masks)
        self._install_hooks(engine.module, layers)
        return scored

    def qa_rows(self, micro: int, schedule: QASchedule | None = None) -> dict[str, list]:
        """The labeled pairs of this rank's micro batch `micro` (column -> values)."""
        picked = (schedule or self.schedule).take(micro, self.rank, self.world, self.batch_size)
        return {k: [v[i] for i in picked] for k, v in self.labeled.items()}

    def _score(self, engine: Any, layers: dict, processor: Any) -> dict[str, torch.Tensor]:
        """Per-neuron importance for L_QA (on the answer tokens of labeled pairs), summed over ranks."""
        sizes = {layer: _shape(params[0][1])[params[0][2]] for layer, params in layers.items()}
        if self.score in ("random", "all"):
            gen = torch.Generator().manual_seed(self.seed)
            return {
                layer: torch.rand(n, generator=gen) if self.score == "random" else torch.ones(n)
                for layer, n in sorted(sizes.items())
            }
        import deepspeed

        scores = {layer: torch.zeros(n) for layer, n in sizes.items()}
        flat = [(layer, p, axis) for layer, params in layers.items() for _, p, axis in params]
        scoring = QASchedule(self.schedule.n, self.seed + 1)  # its own order, independent of training's
        for k in range(self.score_batches):
            t0 = time.perf_counter()
            rows = self.qa_rows(k, scoring)
            inputs = encode_rows(processor, *(rows[c] for c in QA_COLUMNS), engine.device)
            loss = engine.module(**inputs).loss  # the bare module: no DeepSpeed backward hooks
            # autograd.grad leaves .grad and DeepSpeed's reduction hooks untouched: scoring moves no weight
            grads = torch.autograd.grad(loss, [p for _, p, _ in flat], allow_unused=True)
            with deepspeed.zero.GatheredParameters([p for _, p, _ in flat], enabled=self.score == "taylor"):
                for (layer, p, axis), g in zip(flat, grads, strict=True):
                    if g is not None:
                        scores[layer] += _neuron_reduce(g * p.detach() if self.score == "taylor" else g, axis)
            self.scoring_seconds += time.perf_counter() - t0
        if dist.is_initialized():
            packed = torch.cat([scores[layer] for layer in sorted(scores)]).to(collective_device())
            dist.all_reduce(packed)
            packed = packed.cpu()
            scores = dict(zip(sorted(scores), torch.split(packed, [sizes[k] for k in sorted(scores)]), strict=True))
        return scores

    def _install_hooks(self, model: torch.nn.Module, layers: dict) -> None:
        """Gradient hooks that, during the caption pass, keep only the selected neurons' gradients."""
        axes = {id(p): (layer, axis) for layer, params in layers.items() for _, p, axis in params}

        def hook_for(param: torch.nn.Parameter):
            where = axes.get(id(param))

            def hook(grad: torch.Tensor) -> torch.Tensor:
                if not self.caption_pass:
                    return grad
                if where is None:
                    return torch.zeros_like(grad)
                layer, axis = where
                return grad * _neuron_mask(self.masks[layer].to(grad.device, grad.dtype), grad, axis)

            return hook

        for param in model.parameters():
            if param.requires_grad:
                param.register_hook(hook_for(param))

    def batch_rows(self, rows: dict[str, Any], micro: int) -> dict[str, dict[str, Any]]:
        """The scheduled labeled pairs, and the caption rows unless caption distillation is off."""
        qa = {"qa_inputs": self.qa_rows(micro)}
        return {**qa, "model_inputs": rows} if self.caption_distill else qa

    def step(self, engine: Any, batch: dict[str, Any]) -> dict[str, float]:
        """`batch` holds the encoded labeled pairs (qa_inputs) and caption rows (model_inputs)."""
        qa = engine(**batch["qa_inputs"]).loss
        engine.backward(qa * self.qa_weight)
        if not self.caption_distill:
            return {"loss": qa.item() * self.qa_weight, "loss_qa": qa.item()}
        engine.step()  # inside the accumulation window: no optimizer step yet
        self.caption_pass = True
        try:
            cap = engine(**batch["model_inputs"]).loss
            engine.backward(cap * self.caption_weight)
        finally:
            self.caption_pass = False
        return {
            "loss": qa.item() * self.qa_weight + self.caption_weight * cap.item(),
            "loss_qa": qa.item(),
            "loss_cap": cap.item(),
            "masks_restored": float(self.restored),
            "scoring_seconds": self.scoring_seconds,
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"score.{layer}": s for layer, s in self.scores.items()}
        state.update({f"mask.{layer}": m.to(torch.uint8) for layer, m in self.masks.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.scores = {k[len("score.") :]: v for k, v in state.items() if k.startswith("score.")}
        self.masks = {k[len("mask.") :]: v.bool() for k, v in state.items() if k.startswith("mask.")}
        self.restored = bool(self.masks)


def mask_summary(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Selected / total neurons per layer, for the stage's counts."""
    masks = {k[len("mask.") :]: v for k, v in state.items() if k.startswith("mask.")}
    return {layer: [int(m.sum()), int(m.numel())] for layer, m in sorted(masks.items())}


def score_arrays(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Scores per layer as numpy (for plots)."""
    return {k[len("score.") :]: v.numpy() for k, v in sorted(state.items()) if k.startswith("score.")}
