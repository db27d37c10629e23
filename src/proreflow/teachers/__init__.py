"""Teachers: velocity fields in our convention (t = 0 data, t = 1 noise, v = eps - x0).

- `GaussianMixture`: analytic data distribution with its exact marginal velocity (a test oracle).
- `NetworkTeacher`: any trained velocity network, frozen and called without autograd.
- `FlowVelocity`: networks that predict our velocity (SD3-style transformers, digits UNets; identity time map).
- `vp.VPVelocity`: eps / v-prediction diffusers UNets (SD1.x/2.x/SDXL), imported from teachers.vp.
"""

from proreflow.teachers.flow import FlowVelocity, NetworkTeacher
from proreflow.teachers.gmm import GaussianMixture

__all__ = ["FlowVelocity", "GaussianMixture", "NetworkTeacher"]
