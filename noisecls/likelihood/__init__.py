"""Log-likelihood estimators: one interface (log p(x) in nats per sample) and bits/dim.

- ``elbo.ddpm_elbo_nll``: discrete DDPM variational bound (an upper bound on the NLL).
- ``ode.ode_log_likelihood``: probability-flow ODE with exact or Hutchinson trace.
- ``dequantize``: uniform dequantization of k-level data and the bits/dim conversion.
"""

from noisecls.likelihood.dequantize import dequantize, nll_to_bits_per_dim
from noisecls.likelihood.elbo import ddpm_elbo_nll
from noisecls.likelihood.ode import ode_log_likelihood

__all__ = ["ddpm_elbo_nll", "dequantize", "nll_to_bits_per_dim", "ode_log_likelihood"]
