"""diffusers models and schedulers as a noisecls backbone and noise schedule.

A diffusers model (``UNet2DModel`` or any model called as model(x, t).sample) trained under a
DDPM-type scheduler becomes a sigma-space Denoiser as ``PredictionDenoiser(DiffusersModel(path),
DiffusersSchedule(path), DiffusersSchedule(path).prediction)``, or ``load_pretrained(path)``.

Correspondence with diffusers (T = num_train_timesteps, k = 0..T-1 its timestep index):

- Levels: noisecls level k + 1 is diffusers timestep k, with alpha_bar = the scheduler's
  ``alphas_cumprod[k]`` (its float32 table, as its step function uses it); the network receives
  k (``DiscreteSchedule.noise_input``).
- sigma -> timestep: VE sigma = sqrt((1 - alpha_bar) / alpha_bar). A sigma between two levels
  is "interpolate"d (default: k fractional, linear in log sigma between the neighbouring levels,
  as k-diffusion's ``DiscreteSchedule.sigma_to_t``; diffusers' UNets embed fractional timesteps)
  or mapped to the "nearest" level in log sigma (k-diffusion's ``quantize``); x is scaled by the
  alpha of the sigma itself, 1 / sqrt(1 + sigma²), either way. On the scheduler's own grid both
  give the integer timestep.
- Sampling grid: ``sampling_sigmas(n)`` are the sigmas of ``scheduler.set_timesteps(n)``
  (``DiffusersSchedule(timestep_spacing=...)``: "linspace" by default, None for the scheduler
  config's "leading" / "trailing" / "linspace", with its ``steps_offset``), then 0.
  noisecls's ``sample_ddim`` (eta) and ``sample_ddpm`` on it are diffusers' ``DDIMScheduler`` and
  ``DDPMScheduler`` loops on the same noise (DDPM's ``variance_type`` "fixed_small" /
  "fixed_small_log": the posterior variance beta-tilde of the strided chain), with these
  conditions: ``clip_sample`` and ``thresholding`` off (noisecls denoisers do not clip x0);
  DDIM steps to t - T // n, which is the next listed timestep for "leading" and for "trailing"
  when n divides T (its "linspace" grid does not line up); DDIM's final alpha must be 1
  (``set_alpha_to_one: true``): with false, diffusers stops at alpha_bar_0 (``final_sigma``)
  where noisecls's grid ends at 0.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from noisecls.errors import NoiseclsError
from noisecls.pretrained.extra import import_diffusers
from noisecls.process.schedules import DiscreteSchedule

#: diffusers' prediction_type -> noisecls's prediction.
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


# ------------------------------------------------------------------------------------ locating
def _hub_id(source: str) -> bool:
    """Whether ``source`` reads as a hub id "owner/name" (not a relative checkpoint path)."""
    return (
        source.count("/") == 1
        and not source.startswith((".", "/", "~"))
        and Path(source).suffix not in (".ckpt", ".pt", ".pth", ".safetensors")
    )


def resolve_source(source: str) -> Path:
    """The local directory of a diffusers model: ``source`` itself, or the snapshot of the Hugging
    Face hub id ``source`` already in the local cache (never downloaded: one-line error)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists() or not _hub_id(source):
        raise NoiseclsError(f"{source} is not a diffusers model directory")
    import_diffusers()  # huggingface_hub comes with the extra
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(source, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError) as err:
        raise NoiseclsError(
            f"{source} is neither a local directory nor a model in the local Hugging Face cache "
            "(offline: nothing is downloaded); download it once with `huggingface-cli download "
            f"{source}` or pass its directory"
        ) from err


def _read_json(file: Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise NoiseclsError(f"cannot read {file}: {err}") from err


def is_diffusers_source(source: str) -> bool:
    """Whether ``source`` names a diffusers directory (pipeline or model folder) or a cached hub
    id, rather than a noisecls checkpoint file."""
    path = Path(source).expanduser()
    if path.is_dir():
        return (path / "model_index.json").is_file() or (path / "config.json").is_file()
    return not path.exists() and _hub_id(source)


def locate(source: str) -> tuple[Path, Path]:
    """(model folder, scheduler folder) of a pipeline directory (``model_index.json`` with
    ``unet/`` and ``scheduler/``) or of a model folder (``config.json``) whose scheduler config
    lies next to it (``scheduler_config.json``) or in a sibling ``scheduler/`` folder."""
    root = resolve_source(source)
    if (root / "model_index.json").is_file():
        components = _read_json(root / "model_index.json")
        names = [n for n in ("unet", "transformer") if n in components]
        if not names or "scheduler" not in components:
            raise NoiseclsError(f"{root} is a pipeline without a unet and a scheduler")
        return root / names[0], root / "scheduler"
    if not (root / "config.json").is_file():
        raise NoiseclsError(f"{root} holds neither model_index.json nor a model's config.json")
    for scheduler in (root, root.parent / "scheduler"):
        if (scheduler / "scheduler_config.json").is_file():
            return root, scheduler
    raise NoiseclsError(
        f"no scheduler_config.json next to {root} or in {root.parent / 'scheduler'}: the noise "
        "schedule the model was trained under is needed"
    )


def _diffusers_class(config: dict[str, Any], where: Path) -> type:
    diffusers = import_diffusers()
    name = config.get("_class_name")
    cls = getattr(diffusers, str(name), None) if name else None
    if cls is None:
        raise NoiseclsError(f"{where} names no diffusers class (_class_name: {name!r})")
    return cls


def load_scheduler(source: str) -> Any:
    """The diffusers scheduler object of ``source`` (built from its config, offline)."""
    _, folder = locate(source)
    config = _read_json(folder / "scheduler_config.json")
    scheduler = _diffusers_class(config, folder).from_config(config)
    if not hasattr(scheduler, "alphas_cumprod"):
        raise NoiseclsError(f"{type(scheduler).__name__} has no alphas_cumprod (not DDPM-type)")
    return scheduler


# ------------------------------------------------------------------------------------ schedule
class DiffusersSchedule(DiscreteSchedule):
    """The discrete VP schedule of a diffusers scheduler (see the module docstring).

    Args:
        path: diffusers pipeline / model directory, or a hub id in the local cache.
        timestep_spacing: the sampling grid's spacing; None: the scheduler config's (diffusers'
            default is "leading"). The default "linspace" spans levels T..1 for every step count,
            which noisecls's likelihood estimators and CDL rely on (they read their sigma range
            from ``sampling_sigmas(2)``; "leading" with 2 steps would give levels 501 and 1).
        timestep_rounding: "interpolate" or "nearest" (how a sigma between levels maps to the
            network's timestep).
    """

    def __init__(
        self,
        path: str,
        timestep_spacing: Literal["linspace", "leading", "trailing"] | None = "linspace",
        timestep_rounding: Literal["interpolate", "nearest"] = "interpolate",
    ) -> None:
        if timestep_rounding not in ("interpolate", "nearest"):
            raise ValueError(
                f"timestep_rounding: interpolate or nearest, not {timestep_rounding!r}"
            )
        scheduler = load_scheduler(path)
        alpha_bar = scheduler.alphas_cumprod.to(torch.float64)
        super().__init__("linear", num_levels=alpha_bar.numel())
        self.kind = "diffusers"
        self.alpha_bar = torch.cat([alpha_bar.new_ones(1), alpha_bar])
        self._log_ve_sigma = 0.5 * torch.log((1 - alpha_bar) / alpha_bar)
        self.scheduler = scheduler
        self.timestep_spacing = timestep_spacing or scheduler.config.timestep_spacing
        self.timestep_rounding = timestep_rounding
        prediction_type = scheduler.config.get("prediction_type", "epsilon")
        if prediction_type not in PREDICTIONS:
            raise NoiseclsError(f"unsupported diffusers prediction_type {prediction_type!r}")
        #: what the model predicts, as noisecls names it (eps, v or x0).
        self.prediction: Literal["eps", "v", "x0"] = PREDICTIONS[prediction_type]

    def noise_input(self, t: Tensor) -> Tensor:
        """The diffusers timestep k = level - 1 (rounded to the nearest level if so set), [B]."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return (t.round() if self.timestep_rounding == "nearest" else t) - 1

    def sampling_sigmas(self, num_steps: int) -> Tensor:
        """VE sigmas of the scheduler's ``set_timesteps(num_steps)`` under ``timestep_spacing``,
        then 0, float64 [num_steps + 1]."""
        spacing = {"timestep_spacing": self.timestep_spacing}
        scheduler = type(self.scheduler).from_config(self.scheduler.config, **spacing)
        scheduler.set_timesteps(num_steps)
        levels = scheduler.timesteps.to(torch.long) + 1
        sig = self.ve_sigma_at_levels()[levels - 1]
        return torch.cat([sig, sig.new_zeros(1)])

    @property
    def final_sigma(self) -> float:
        """The VE sigma where diffusers' last DDIM step lands: 0 unless ``set_alpha_to_one`` is
        false (then alpha_bar_0's)."""
        final = float(getattr(self.scheduler, "final_alpha_cumprod", 1.0))
        return ((1 - final) / final) ** 0.5

    def diffusers_config(self) -> dict[str, Any]:
        """The scheduler's configuration (to write the model back in diffusers' format)."""
        return dict(self.scheduler.config)


# ------------------------------------------------------------------------------------ backbone
class DiffusersModel(nn.Module):
    """A diffusers model as a noisecls backbone: forward(x_in [B, C, H, W], timestep [B] (float,
    k of the scheduler), class_labels [B] | None) -> model(x_in, timestep).sample.

    Its parameters are the diffusers model's (``model.*``), so a method that holds it as ``net``
    trains, checkpoints and averages them like any backbone; :func:`save_diffusers` writes them
    back in diffusers' format.

    Args:
        path: diffusers pipeline / model directory, or a hub id in the local cache.
        weights: "pretrained" (from the directory) or "config" (the architecture only, randomly
            initialised: for loading a noisecls checkpoint's weights into it).
    """

    def __init__(self, path: str, weights: Literal["pretrained", "config"] = "pretrained") -> None:
        super().__init__()
        folder, _ = locate(path)
        config = _read_json(folder / "config.json")
        cls = _diffusers_class(config, folder)
        if config.get("time_embedding_type") == "fourier":
            raise NoiseclsError(
                f"{folder} is a score-SDE (Fourier time) model: wrap it with wrap_network(..., "
                "'score') instead"
            )
        if weights == "pretrained":
            self.model = cls.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False)
        elif weights == "config":
            self.model = cls.from_config(config)
        else:
            raise ValueError(f"weights must be pretrained or config, got {weights!r}")
        self.path = path

    @property
    def num_classes(self) -> int | None:
        """The number of class embeddings (None for unconditional models)."""
        return self.model.config.get("num_class_embeds")

    @property
    def data_shape(self) -> tuple[int, ...]:
        """(C, H, W) of the model's samples."""
        size = self.model.config.sample_size
        h, w = (size, size) if isinstance(size, int) else size
        return (self.model.config.in_channels, h, w)

    def forward(self, x_in: Tensor, noise_in: Tensor, class_labels: Tensor | None = None) -> Tensor:
        timestep = noise_in.to(device=x_in.device, dtype=x_in.dtype)
        if class_labels is None:
            return self.model(x_in, timestep).sample
        return self.model(x_in, timestep, class_labels=class_labels).sample
