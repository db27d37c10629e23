"""Teachers: velocity fields in our convention (t = 0 data, t = 1 noise, v = eps - x0).

- `GaussianMixture`: analytic data distribution with its exact marginal velocity (a test oracle).
- `NetworkTeacher`: any trained velocity network, frozen and called without autograd.
"""

from proreflow.teachers.flow import NetworkTeacher
from proreflow.teachers.gmm import GaussianMixture

__all__ = ["GaussianMixture", "NetworkTeacher"]
