"""Log-likelihood estimators: one interface (log p(x) in nats per sample) and bits/dim.

- ``elbo.ddpm_elbo_nll``: discrete DDPM variational bound (an upper bound on the NLL).
- ``ode.ode_log_likelihood``: probability-flow ODE with exact or Hutchinson trace.
- ``itd.itd_log_likelihood``: information-theoretic (MMSE over log-SNR) estimate, as CDL uses.
- ``dequantize``: uniform dequantization of k-level data and the bits/dim conversion.
"""

from noisecls.likelihood.cdm import cdm_log_density, cdm_log_likelihood
from noisecls.likelihood.dequantize import dequantize, nll_to_bits_per_dim
from noisecls.likelihood.elbo import ddpm_elbo_nll
from noisecls.likelihood.itd import GaussianReference, ITDConfig, itd_log_likelihood
from noisecls.likelihood.ode import ode_log_likelihood

__all__ = [
    "GaussianReference",
    "ITDConfig",
    "cdm_log_density",
    "cdm_log_likelihood",
    "ddpm_elbo_nll",
    "dequantize",
    "itd_log_likelihood",
    "nll_to_bits_per_dim",
    "ode_log_likelihood",
]
