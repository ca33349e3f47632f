"""Training the xLARD corrector: ``xlard train CONFIG`` (method.md sections 5-6).

- :mod:`xlard.train.config`: typed, validated run configuration (YAML/JSON).
- :mod:`xlard.train.ppo`: the pure PPO arithmetic (advantages, surrogate, anchor, schedule).
- :mod:`xlard.train.rollout`: encoding items and sampling corrections.
- :mod:`xlard.train.projector`: R_phi's buffer and fit loop.
- :mod:`xlard.train.rewarding`: the reward function from the configured source.
- :mod:`xlard.train.data`, :mod:`xlard.train.checkpoint`, :mod:`xlard.train.metrics`.
- :mod:`xlard.train.trainer`: the loop, the only module here that writes to disk.

Dependencies point one way: this package imports the method layer; nothing
in the method layer imports it. Importing it does not import diffusers.
"""
from xlard.train.config import TrainConfig, config_from_dict, describe, load_config

__all__ = ["TrainConfig", "load_config", "config_from_dict", "describe", "train", "main", "parse_overrides"]


def train(cfg, resume: bool = False, backbone=None) -> dict:
    """Run or resume a training run (see :func:`xlard.train.trainer.train`)."""
    from xlard.train.trainer import train as _train

    return _train(cfg, resume=resume, backbone=backbone)


def parse_overrides(items: list[str] | None) -> dict:
    """``--set KEY=VALUE`` arguments -> ``{dotted key: value}``, values parsed as YAML scalars.

    ``ppo.epochs=2`` gives an int, ``optim.lr=3e-3`` a float (YAML 1.2 floats, as in config files).

    Raises:
        ValueError: an item without ``=``, or a value that is not valid YAML.
    """
    from xlard.train.config import yaml_load

    changes = {}
    if isinstance(items, str):  # one item, not its characters
        items = [items]
    for item in items or []:
        if not isinstance(item, str):
            raise ValueError(f"--set expects key=value strings, got {item!r}")
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            changes[key.strip()] = yaml_load(value)
        except Exception as exc:  # noqa: BLE001 - yaml.YAMLError, and a constructor's own errors
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise ValueError(f"--set {item}: not a valid value ({reason})") from None
    return changes


def main(config: str, resume: bool = False, out: str | None = None, overrides: list[str] | None = None,
         check=None) -> int:
    """The ``xlard train`` command: load CONFIG, apply ``--out`` and ``--set key=value`` overrides, run.

    ``check(cfg)``, when given, runs on the loaded config before anything else (the CLI checks the prompt
    files and the backbone's name there, before the trainer loads the backbone)."""
    changes = parse_overrides(overrides)
    if out is not None:
        changes["out"] = out
    cfg = load_config(config, overrides=changes)
    from xlard import _io

    # Before the backbone loads: an out folder that cannot be made is named now, not after minutes of setup.
    try:
        _io.check_writable_folder(cfg.out, "--out" if out is not None else f"train config {config}: out")
    except OSError as exc:  # a read-only or unwritable folder: the user's to fix (exit 2), as for eval and demo
        if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
            raise
        raise PermissionError(str(exc)) from None
    if check is not None:
        check(cfg)
    summary = train(cfg, resume=resume)
    if summary.get("corrector"):
        print(f"trained corrector: {summary['corrector']}")
    return 0
