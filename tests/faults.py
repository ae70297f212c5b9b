"""Objective wrappers for the training tests: a first attempt that dies (or is killed) mid-run, and a probe of the
caption gradient."""

import os
import signal
import sys
from pathlib import Path

import ray.cloudpickle

from leaml_ray.train.core import Objective

# Ray Train workers unpickle the objective; they cannot import the tests package, so its classes travel by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Wrapped(Objective):
    """`inner`, every call passed through: the base of the wrappers below."""

    def __init__(self, inner: Objective):
        self.inner = inner
        self.backward_passes, self.state_name = inner.backward_passes, inner.state_name

    def param_groups(self, model, weight_decay):
        return self.inner.param_groups(model, weight_decay)

    def setup(self, engine, job, processor, labeled):
        return self.inner.setup(engine, job, processor, labeled)

    def batch_rows(self, rows, micro):
        return self.inner.batch_rows(rows, micro)

    def step(self, engine, batch):
        return self.inner.step(engine, batch)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


class DiesOnce(Wrapped):
    """`inner`, except that the step of micro batch `micro` raises while `marker` does not exist (and creates it):
    a worker lost mid-training, once."""

    def __init__(self, inner: Objective, micro: int, marker: str):
        super().__init__(inner)
        self.micro, self.marker = micro, marker

    def step(self, engine, batch):
        if batch["micro"] == self.micro and not os.path.exists(self.marker):
            Path(self.marker).touch()
            self.fail()
        return self.inner.step(engine, batch)

    def fail(self) -> None:
        raise RuntimeError(f"injected fault at micro batch {self.micro}")


class KilledOnce(DiesOnce):
    """`inner`, except that the worker process running micro batch `micro` is SIGKILLed once (a lost node)."""

    def fail(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


class CaptionGradientProbe(Wrapped):
    """`inner` (a NeuronDistillation), plus, per step, how much caption gradient reached unselected and selected
    neurons: a hook after the objective's own sees each gradient as the optimizer will (metrics "cap_grad_unselected"
    and "cap_grad_selected"). With the QA loss on, every weight moves, so the weights cannot show this."""

    def __init__(self, inner: Objective):
        super().__init__(inner)
        self.sums = {"cap_grad_unselected": 0.0, "cap_grad_selected": 0.0}

    def setup(self, engine, job, processor, labeled):
        from leaml_ray.train.neurons import _neuron_mask, neuron_params

        scored = self.inner.setup(engine, job, processor, labeled)
        for layer, params in neuron_params(engine.module, self.inner.scope).items():
            for _, param, axis in params:

                def probe(grad, layer=layer, axis=axis):
                    if self.inner.caption_pass:
                        mask = _neuron_mask(self.inner.masks[layer].to(grad.device), grad, axis).expand_as(grad)
                        self.sums["cap_grad_unselected"] += grad[~mask].abs().sum().item()
                        self.sums["cap_grad_selected"] += grad[mask].abs().sum().item()
                    return grad

                param.register_hook(probe)
        return scored

    def step(self, engine, batch):
        metrics = self.inner.step(engine, batch)
        out = {**metrics, **self.sums}
        self.sums = dict.fromkeys(self.sums, 0.0)
        return out
