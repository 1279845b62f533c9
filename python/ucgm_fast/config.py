"""Run configuration: YAML sections mirroring the published UCGM recipes, dotted overrides, strict keys.

A config is a nested dict with the sections of the published recipes (``data``, ``vae``, ``model``,
``train``, ``optimizer``, ``transport``, ``sample``) plus ``eval`` and the top-level ``output_dir``.
Every published key is accepted under its published name (typos included: ``weight_funcion``), so
``configs/training_multi_steps/*.yaml`` from LINs-lab/UCGM load unchanged; keys this library adds are
documented in :data:`DEFAULTS`. An unknown key anywhere is an error that names it.
"""
from __future__ import annotations

import copy
import difflib
import os
import re
from typing import Any, Dict, Iterable, Optional

import yaml

__all__ = ["DEFAULTS", "ConfigError", "default_config", "load_config", "apply_overrides", "merge_config",
           "validate_config", "dump_config", "latent_size", "run_dir", "read_yaml", "sampler_settings",
           "check_sampler_settings"]


class _Loader(yaml.SafeLoader):
    """YAML 1.1 safe loading, plus floats written without a dot (``1e-4``), which YAML 1.1 reads
    as strings: learning rates are written that way."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789"))


def read_yaml(text_or_file) -> Any:
    """YAML as configs are read (``1e-4`` is a number, as YAML 1.2 has it), without any checks."""
    return yaml.load(text_or_file, Loader=_Loader)


class ConfigError(ValueError):
    """A config that cannot be used: unknown key, wrong type, bad value. The message names the key."""


# Keys whose value is a free-form mapping passed through to a constructor (which checks its own names).
_FREE = object()

#: Every accepted key with its default. ``None`` means "unset" (any type accepted for it).
DEFAULTS: Dict[str, Any] = {
    "output_dir": "./outputs",       # the run directory: checkpoints/, samples/, metrics.jsonl, ...
    "exp_name": None,                # optional subfolder of output_dir (published: derived from the path)
    "data": {
        "name": "digits",            # digits | fashion-mnist | image-folder | latents
        "data_path": None,           # image-folder root / latents .npy|.npz file or published shard folder
        "fid_reference_file": None,  # published key, accepted but not read (ucgm-eval scores against held-out data)
        "image_size": 8,             # pixel size; the model sees image_size // vae.downsample_ratio
        "num_classes": 10,
        "num_workers": 0,            # loader worker processes (0: in-process, bit-exact resume)
        "latent_norm": False,        # latents: standardise per channel with the dataset's mean/std
        "latent_multiplier": 1.0,    # latents: scale after normalisation (0.18215 for SD-VAE)
        "channels": None,            # image-folder: 1 (grey) or 3 (RGB); None: the dataset's own
    },
    "vae": {
        "type": None,                # published key: which autoencoder made the latents (informational)
        "downsample_ratio": 1,       # published key: pixels per latent cell
    },
    "model": {
        "type": "DiT-S/2",           # registry name, DiT-S/1 .. DiT-XL/8 (or TiT-*)
        "in_chans": None,            # None: the dataset's channel count
        "options": _FREE,            # extra keyword arguments of get_model (TiT options: qk_norm, ...)
    },
    "train": {
        "ckpt": None,                # published: a checkpoint (file in checkpoints/ or a path) to start from
        "init_from": None,           # start from this checkpoint's weights at step 0 (few-step tuning)
        "init_weights": "model",     # with ckpt/init_from: model (as published: the model from its model
                                     # weights, the EMA from its EMA) | ema (both from its EMA weights)
        "no_reopt": True,            # with ckpt/init_from: do not load the optimizer state
        "no_reuni": True,            # with ckpt/init_from: do not load the UCGM state (target network)
        "no_buffer": False,          # published: DDP broadcast_buffers=False
        "max_steps": 1000,
        "max_minutes": None,         # wall-clock budget: stop (and checkpoint) when it is spent
        "global_batch_size": 128,
        "global_seed": 0,
        "log_every": 10,
        "ckpt_every": 500,
        "keep_last": 3,              # checkpoints kept (oldest deleted)
        "sample_every": 0,           # sample grid PNG every N steps (0: only at the end)
        "grid_size": 64,             # images in the sample grid (at most 256: one sampling batch)
        "ema_decay": 0.9999,         # 1.0 freezes the EMA where it starts (accepted as published, with a warning)
        "ema_warmup": False,         # decay min(ema_decay, (1 + step) / (10 + step)): short runs forget the init
        "precision": "auto",         # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
        "compile": False,            # torch.compile the model
        "zero_nonfinite_grads": True,  # nan/inf gradient entries -> 0, after clipping (as published: with
                                       # max_grad_norm set, one such entry zeroes the whole update)
        "device": "auto",            # auto | cpu | cuda
        "threads": None,             # torch.set_num_threads on CPU (None: torch's default)
        "progress": True,            # tqdm progress bar on rank 0
    },
    "optimizer": {
        "type": "AdamW",             # AdamW | Adam | RAdam
        "lr": 1e-4,
        "weight_decay": 0.0,
        "beta1": 0.9,
        "beta2": 0.999,
        "eps": 1e-8,
        "max_grad_norm": None,       # gradient clipping by the global norm of the raw gradients (None: off)
        "lr_schedule": "constant",   # constant | cosine | linear: decay from lr to min_lr over train.max_steps
        "warmup_steps": 0,           # linear warm-up from 0 to lr over this many steps
        "min_lr": 0.0,               # the decay's end value
    },
    "transport": {
        "type": "Linear",
        "lab_drop_ratio": 0.1,
        "consistc_ratio": 0.0,
        "enhanced_ratio": 0.0,
        "scaled_cbl_eps": 0.0,
        "ema_decay_rate": 0.999,
        "enhanced_range": [0.0, 0.75],
        "time_dist_ctrl": [1.0, 1.0, 1.0],
        "weight_funcion": None,      # published spelling; None | Cosine
        "wt_cosine_loss": False,
    },
    "sample": {
        "ckpt": None,                # published key, accepted but not read (ucgm-sample / ucgm-eval take --ckpt)
        "type": "UNI",
        "cfg_scale": 0.0,
        "cfg_interval": [0.0, 0.75],
        "cfg_channels": None,        # guide only the first N channels (the published networks: 3); null: all
        "sampling_steps": 30,
        "stochast_ratio": 0.0,       # float or "Auto"
        "extrapol_ratio": 0.0,
        "sampling_order": 1,
        "time_dist_ctrl": [1.0, 1.0, 1.0],
        "rfba_gap_steps": [0.001, 0.001],
        "per_batch_size": 250,
        "fid_sample_num": 1000,      # published key, accepted but not read (ucgm-eval: eval.num_samples)
        "seed": 0,                   # ucgm-sample / ucgm-eval seed unless --seed is given
    },
    "eval": {
        "num_samples": 1000,         # generated images scored by ucgm-eval
        "classifier_epochs": None,   # feature classifier training epochs (None: the metrics default)
        "cache_dir": None,           # None: ~/.cache/ucgm_fast
    },
}

# Values restricted to a set of names.
_CHOICES = {
    "data.name": ("digits", "fashion-mnist", "image-folder", "latents"),
    "train.precision": ("auto", "bf16", "fp32"),
    "train.init_weights": ("ema", "model"),
    "train.device": ("auto", "cpu", "cuda"),
    "optimizer.type": ("AdamW", "Adam", "RAdam"),
    "optimizer.lr_schedule": ("constant", "cosine", "linear"),
    "sample.type": ("UNI",),
}
# Keys that must hold lists of numbers, with their lengths.
_LISTS = {"transport.enhanced_range": 2, "transport.time_dist_ctrl": 3, "sample.cfg_interval": 2,
          "sample.time_dist_ctrl": 3, "sample.rfba_gap_steps": 2}
_POSITIVE_INTS = ("train.max_steps", "train.global_batch_size", "train.log_every", "train.ckpt_every",
                  "train.keep_last", "train.grid_size", "sample.sampling_steps", "sample.per_batch_size",
                  "data.image_size", "data.num_classes", "vae.downsample_ratio", "eval.num_samples")
# Keys whose default is null (unset), with the type a set value must have ("int+": an integer >= 1).
_OPTIONAL = {"exp_name": str, "data.data_path": str, "data.fid_reference_file": str, "vae.type": str,
             "model.in_chans": "int+", "train.ckpt": str, "train.init_from": str, "train.max_minutes": float,
             "train.threads": "int+", "optimizer.max_grad_norm": float, "sample.ckpt": str,
             "eval.classifier_epochs": "int+", "eval.cache_dir": str, "sample.cfg_channels": "int+"}


def merge_config(base: Dict[str, Any], update: Dict[str, Any], schema: Optional[Dict[str, Any]] = None,
                 _prefix: str = "") -> Dict[str, Any]:
    """base updated recursively with update; a key not in schema (default DEFAULTS) raises ConfigError.

    Free-form mappings (``model.options``) take their keys from update unchecked.
    """
    schema = DEFAULTS if schema is None else schema
    out = copy.deepcopy(base)
    unknown = []
    for key, value in (update or {}).items():
        path = f"{_prefix}{key}"
        if key not in schema:  # a misspelt section is named with its keys, so they get suggestions
            leaves = list(_flat_keys(value)) if isinstance(value, dict) else []
            unknown.extend([f"{path}.{leaf}" for leaf in leaves] or [path])
            continue
        if schema[key] is _FREE:
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"config key {path!r} must be a mapping, got {type(value).__name__}")
            current = out.get(key) if isinstance(out.get(key), dict) else {}
            out[key] = {**current, **copy.deepcopy(value or {})}
        elif isinstance(schema[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path!r} is a section; expected a mapping, got {value!r}")
            out[key] = merge_config(out.get(key) or {}, value, schema[key], path + ".")
        else:
            out[key] = copy.deepcopy(value)
    if unknown:
        raise ConfigError("unknown config key(s): " + ", ".join(_suggest(p) for p in unknown))
    return out


def default_config() -> Dict[str, Any]:
    """A deep copy of DEFAULTS with free-form mappings empty."""
    def strip(d):
        return {k: (strip(v) if isinstance(v, dict) else ({} if v is _FREE else copy.deepcopy(v)))
                for k, v in d.items()}
    return strip(DEFAULTS)


def _suggest(path: str) -> str:
    # Whole dotted keys first; else a misspelt section ('trian.max_steps') and its key, part by part.
    close = difflib.get_close_matches(path, list(_flat_keys(DEFAULTS)), n=1, cutoff=0.75)
    if not close and "." in path:
        section, key = path.split(".", 1)
        sections = [s for s in DEFAULTS if isinstance(DEFAULTS[s], dict)]
        fixed = section if section in sections else next(iter(difflib.get_close_matches(section, sections, 1, 0.6)), None)
        if fixed is not None:
            keys = [k for k in _flat_keys(DEFAULTS[fixed])]
            match = key if key in keys else next(iter(difflib.get_close_matches(key, keys, 1, 0.75)), None)
            if match is not None:
                close = [f"{fixed}.{match}"]
    return f"{path!r} (did you mean {close[0]!r}?)" if close else repr(path)


def _flat_keys(d: Dict[str, Any], prefix: str = "") -> Iterable[str]:
    for key, value in d.items():
        if isinstance(value, dict):
            yield from _flat_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def _parse_value(text: str) -> Any:
    # YAML scalars: numbers, booleans, null, [lists]; anything else stays a string.
    try:
        return read_yaml(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def apply_overrides(cfg: Dict[str, Any], overrides: Iterable[str]) -> Dict[str, Any]:
    """Applies ``dotted.key=value`` strings (values parsed as YAML scalars / flow lists)."""
    update: Dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like dotted.key=value (e.g. train.max_steps=30)")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key component")
        node = update
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
        node[parts[-1]] = _parse_value(text)
    try:
        return merge_config(cfg, update)
    except ConfigError as err:
        raise ConfigError(f"{err} (in command-line overrides)") from None


def load_config(path: Optional[str] = None, overrides: Iterable[str] = ()) -> Dict[str, Any]:
    """DEFAULTS <- YAML file <- overrides, validated. Raises ConfigError naming any bad key."""
    cfg = default_config()
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} does not exist")
        with open(path, "r", encoding="utf-8") as f:
            try:
                data = read_yaml(f) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"config file {path!r} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping of sections, got {type(data).__name__}")
        try:
            cfg = merge_config(cfg, data)
        except ConfigError as err:
            raise ConfigError(f"{err} in {path}") from None
    cfg = apply_overrides(cfg, overrides)
    validate_config(cfg)
    return cfg


def _get(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def validate_config(cfg: Dict[str, Any]) -> None:
    """Type and range checks; raises ConfigError naming the key."""
    for key in _flat_keys(DEFAULTS):
        default = _get(DEFAULTS, key)
        value = _get(cfg, key)
        if default is _FREE or default is None or value is None:
            continue
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
        elif isinstance(default, int) and key != "sample.stochast_ratio":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
        elif isinstance(default, float) and key != "sample.stochast_ratio":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
        elif isinstance(default, str) and not isinstance(value, str):
            raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
    for key, kind in _OPTIONAL.items():
        value = _get(cfg, key)
        if value is None:
            continue
        if kind is str and not isinstance(value, str):
            raise ConfigError(f"config key {key!r} must be a string or null, got {value!r}")
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is float and not number:
            raise ConfigError(f"config key {key!r} must be a number or null, got {value!r}")
        if kind == "int+" and not (number and isinstance(value, int) and value >= 1):
            raise ConfigError(f"config key {key!r} must be an integer >= 1 or null, got {value!r}")
    for key, choices in _CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            raise ConfigError(f"config key {key!r} is {value!r}; valid values: {', '.join(map(str, choices))}")
    for key, length in _LISTS.items():
        value = _get(cfg, key)
        if not (isinstance(value, (list, tuple)) and len(value) == length
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise ConfigError(f"config key {key!r} must be a list of {length} numbers, got {value!r}")
    for key in _POSITIVE_INTS:
        if _get(cfg, key) < 1:
            raise ConfigError(f"config key {key!r} must be >= 1, got {_get(cfg, key)!r}")
    stoch = cfg["sample"]["stochast_ratio"]
    auto = isinstance(stoch, str) and stoch.lower() == "auto"
    number = isinstance(stoch, (int, float)) and not isinstance(stoch, bool)
    if not (auto or (number and 0 <= stoch <= 1)):
        raise ConfigError(f"config key 'sample.stochast_ratio' must be in [0, 1] or 'Auto', got {stoch!r}")
    if not 0.0 <= cfg["train"]["ema_decay"] <= 1.0:
        raise ConfigError(f"config key 'train.ema_decay' must be in [0, 1], got {cfg['train']['ema_decay']!r}")
    if cfg["sample"]["sampling_order"] not in (1, 2):
        raise ConfigError(f"config key 'sample.sampling_order' must be 1 or 2, got {cfg['sample']['sampling_order']!r}")
    if cfg["data"]["image_size"] % cfg["vae"]["downsample_ratio"]:
        raise ConfigError(f"config key 'data.image_size' ({cfg['data']['image_size']}) must be divisible by "
                          f"'vae.downsample_ratio' ({cfg['vae']['downsample_ratio']})")
    opt = cfg["optimizer"]
    for key in ("beta1", "beta2"):
        if opt[key] is None or not 0.0 <= opt[key] < 1.0:
            raise ConfigError(f"config key 'optimizer.{key}' must be in [0, 1), got {opt[key]!r}")
    for key in ("lr", "eps", "weight_decay"):
        if opt[key] is None or opt[key] < 0:
            raise ConfigError(f"config key 'optimizer.{key}' must be >= 0, got {opt[key]!r}")
    if cfg["optimizer"]["max_grad_norm"] is not None and cfg["optimizer"]["max_grad_norm"] <= 0:
        raise ConfigError("config key 'optimizer.max_grad_norm' must be > 0 or null")
    if cfg["optimizer"]["warmup_steps"] < 0 or not 0 <= cfg["optimizer"]["min_lr"] <= cfg["optimizer"]["lr"]:
        raise ConfigError("config keys 'optimizer.warmup_steps' must be >= 0 and 'optimizer.min_lr' in [0, lr]")
    if cfg["train"]["max_minutes"] is not None and cfg["train"]["max_minutes"] <= 0:
        raise ConfigError("config key 'train.max_minutes' must be > 0 or null")
    if cfg["train"]["sample_every"] < 0:
        raise ConfigError("config key 'train.sample_every' must be >= 0")
    if cfg["train"]["init_from"] and cfg["train"]["ckpt"]:
        raise ConfigError(f"config keys 'train.init_from' ({cfg['train']['init_from']!r}) and 'train.ckpt' "
                          f"({cfg['train']['ckpt']!r}) both name a checkpoint to start from; set one of them")
    if cfg["train"]["grid_size"] > 256:  # sampled as one batch of the model at the end and every sample_every
        raise ConfigError(f"config key 'train.grid_size' must be at most 256, got {cfg['train']['grid_size']!r}")
    if cfg["data"]["num_workers"] < 0:
        raise ConfigError(f"config key 'data.num_workers' must be >= 0, got {cfg['data']['num_workers']!r}")
    if cfg["data"]["channels"] not in (None, 1, 3):
        raise ConfigError(f"config key 'data.channels' must be 1, 3 or null, got {cfg['data']['channels']!r}")
    build_objective(cfg)  # the objective's own checks, before a run loads its data and builds its model
    check_sampler_settings(cfg)  # before a run trains for hours and fails at its first sample grid


def build_objective(cfg: Dict[str, Any]):
    """The :class:`ucgm_fast.UCGM` of the ``transport`` section (published keys); ConfigError when it
    rejects the section."""
    from .objective import _PUBLISHED_KEYS, UCGM

    try:
        return UCGM.from_config(cfg["transport"])
    except (ValueError, TypeError) as err:
        # Name the key as the config spells it: UCGM's message names its own argument.
        keys = [k for k, arg in _PUBLISHED_KEYS.items() if re.search(rf"\b{arg}\b", str(err))]
        where = f"config key 'transport.{keys[0]}'" if keys else "config section 'transport'"
        raise ConfigError(f"{where}: {err}") from None


def sampler_settings(cfg: Dict[str, Any], steps: Optional[int] = None, **overrides) -> Dict[str, Any]:
    """The ``sample`` section (published keys; ``overrides`` win, ``steps`` when given) as keyword
    arguments of :func:`ucgm_fast.sample` (transport from ``transport.type``)."""
    s = {**cfg["sample"], **overrides}
    return dict(transport=cfg["transport"]["type"], steps=int(steps or s["sampling_steps"]),
                order=s["sampling_order"], stochast_ratio=s["stochast_ratio"], extrapol_ratio=s["extrapol_ratio"],
                time_dist_ctrl=s["time_dist_ctrl"], rfba_gap_steps=s["rfba_gap_steps"], cfg_scale=s["cfg_scale"],
                cfg_interval=s["cfg_interval"], cfg_channels=s["cfg_channels"])


def check_sampler_settings(cfg: Dict[str, Any], steps: Optional[int] = None, **overrides) -> None:
    """ConfigError when :func:`ucgm_fast.sample` would reject the sample section (with overrides)."""
    from .sampler import check_settings

    try:
        check_settings(**sampler_settings(cfg, steps, **overrides))
    except (ValueError, TypeError) as err:
        raise ConfigError(f"sampler settings (config section 'sample' and flags): {err}") from None


def latent_size(cfg: Dict[str, Any]) -> int:
    """Spatial size the model sees: data.image_size // vae.downsample_ratio (as published)."""
    return cfg["data"]["image_size"] // cfg["vae"]["downsample_ratio"]


def dump_config(cfg: Dict[str, Any]) -> str:
    """The config as YAML text (sections in DEFAULTS order)."""
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)


def run_dir(cfg: Dict[str, Any]) -> str:
    """output_dir, or output_dir/exp_name when exp_name is set."""
    return os.path.join(cfg["output_dir"], cfg["exp_name"]) if cfg["exp_name"] else cfg["output_dir"]
