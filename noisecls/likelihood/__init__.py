"""Log-likelihood estimators: one interface (log p(x) in nats per sample) and bits/dim.

- ``elbo.ddpm_elbo_nll``: discrete DDPM variational bound (an upper bound on the NLL).
- ``ode.ode_likelihood`` / ``ode_log_likelihood``: probability-flow ODE (fixed-step RK4 or
  adaptive dopri5) with exact or Hutchinson trace; the former also returns latent and NFE.
- ``itd.itd_log_likelihood``: information-theoretic (MMSE over log-SNR) estimate, as CDL uses.
- ``dequantize``: uniform dequantization of k-level data, its inverse ``quantize`` and the
  bits/dim conversion.
"""

from noisecls.likelihood.cdm import cdm_log_density, cdm_log_likelihood
from noisecls.likelihood.dequantize import dequantize, nll_to_bits_per_dim, quantize
from noisecls.likelihood.elbo import ddpm_elbo_nll
from noisecls.likelihood.itd import GaussianReference, ITDConfig, itd_log_likelihood
from noisecls.likelihood.ode import ODELikelihood, ode_likelihood, ode_log_likelihood

__all__ = [
    "GaussianReference",
    "ITDConfig",
    "ODELikelihood",
    "cdm_log_density",
    "cdm_log_likelihood",
    "ddpm_elbo_nll",
    "dequantize",
    "itd_log_likelihood",
    "nll_to_bits_per_dim",
    "ode_likelihood",
    "ode_log_likelihood",
    "quantize",
]
