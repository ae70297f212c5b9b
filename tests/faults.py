"""Fault injection for the training tests: an objective wrapper whose first attempt dies mid-run."""

import os
import sys
from pathlib import Path

import ray.cloudpickle

from leaml_ray.train.core import Objective

# Ray Train workers unpickle the objective; they cannot import the tests package, so its classes travel by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class DiesOnce(Objective):
    """`inner`, except that the step of micro batch `micro` raises while `marker` does not exist (and creates it):
    a worker lost mid-training, once."""

    def __init__(self, inner: Objective, micro: int, marker: str):
        self.inner, self.micro, self.marker = inner, micro, marker
        self.backward_passes, self.state_name = inner.backward_passes, inner.state_name

    def param_groups(self, model, weight_decay):
        return self.inner.param_groups(model, weight_decay)

    def setup(self, engine, job, processor, labeled):
        return self.inner.setup(engine, job, processor, labeled)

    def batch_rows(self, rows, micro):
        return self.inner.batch_rows(rows, micro)

    def step(self, engine, batch):
        if batch["micro"] == self.micro and not os.path.exists(self.marker):
            Path(self.marker).touch()
            raise RuntimeError(f"injected fault at micro batch {self.micro}")
        return self.inner.step(engine, batch)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)
