"""A solver written as a PyEPO optModel, for the tests that compare with PyEPO itself."""

import numpy as np


def pyepo_model(sense, solve, d):
    """The exact solver `solve(c, sense)` (a 0/1 vector of length d) as a PyEPO model."""
    from pyepo import EPO
    from pyepo.model.opt import optModel

    class Best(optModel):
        """The same exact solver as a PyEPO model."""

        def __init__(self):
            self.modelSense = EPO.MINIMIZE if sense == "minimize" else EPO.MAXIMIZE
            super().__init__()

        def _getModel(self):
            return None, list(range(d))

        def setObj(self, c):
            self.c = np.asarray(c, dtype=np.float32)

        def solve(self):
            w = solve(self.c, sense).astype(np.float64)
            return w, float(np.dot(self.c.astype(np.float64), w))

        @property
        def num_cost(self):
            return d

    return Best()
