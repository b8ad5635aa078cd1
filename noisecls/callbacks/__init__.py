"""Evaluation callbacks, identical for every method: FID / KID, NLL in bits/dim, denoising MSE per
noise level, sample grids, the ``noisecls predict`` writer and the ``noisecls test`` results file.

Add them under ``trainer.callbacks`` in an experiment YAML; they run every ``every_n_epochs``
validations during ``fit`` (with EMA weights) and once in ``validate`` / ``test``.
"""

from noisecls.callbacks.checkpoint import ModelCheckpoint
from noisecls.callbacks.denoising import DEFAULT_SIGMAS, DenoisingMSECallback
from noisecls.callbacks.ema import EMAWeightAveraging
from noisecls.callbacks.features import (
    DigitsFeatures,
    FeatureExtractor,
    FlattenFeatures,
    InceptionFeatures,
)
from noisecls.callbacks.fid import FIDCallback
from noisecls.callbacks.likelihood import NLLCallback
from noisecls.callbacks.results import MetricRecord, ResultsWriter, metric_records
from noisecls.callbacks.samples import SampleGridCallback, SampleWriter

__all__ = [
    "DEFAULT_SIGMAS",
    "DenoisingMSECallback",
    "DigitsFeatures",
    "EMAWeightAveraging",
    "FIDCallback",
    "FeatureExtractor",
    "FlattenFeatures",
    "InceptionFeatures",
    "MetricRecord",
    "ModelCheckpoint",
    "NLLCallback",
    "ResultsWriter",
    "SampleGridCallback",
    "SampleWriter",
    "metric_records",
]
