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

    ``ppo.epochs=2`` gives an int, ``optim.lr=3e-3`` a float (YAML 1.2 floats, as in config files). A value YAML
    would read with text dropped is refused: `` #`` starts a comment (``out=my run #1`` would be 'my run'), a
    leading ``&``, ``*`` or ``!`` is an anchor, an alias or a tag; quoted (``out='my run #1'``) it is kept.
    ``ppo={epochs: 3}`` changes only the keys it names (see :func:`_add_override`).

    Raises:
        ValueError: an item without ``=``, a value that is not valid YAML, or one YAML would cut.
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
        key = key.strip()
        _check_text_kept(item, key, value)
        try:
            parsed = yaml_load(value)
        except Exception as exc:  # noqa: BLE001 - yaml.YAMLError, and a constructor's own errors
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise ValueError(f"--set {item}: not a valid value ({reason})") from None
        _check_text_kept(item, key, value, parsed)
        _add_override(changes, key, parsed)
    return changes


_UNPARSED = object()


def _after_the_value(text: str) -> str:
    """What of ``text`` lies after the YAML value it holds (a comment YAML dropped), stripped; "" when nothing."""
    import yaml

    from xlard.train.config import _yaml_loader

    try:
        node = yaml.compose(text, Loader=_yaml_loader())
    except yaml.YAMLError:  # the parse itself reports it
        return ""
    return (text if node is None else text[node.end_mark.index:]).strip()


def _check_text_kept(item: str, key: str, raw: str, parsed=_UNPARSED) -> None:
    """Refuse a value YAML would read with some of its text dropped: ``out=my run #1`` gave 'my run' (a comment),
    ``out=&a x`` gave 'x' (an anchor), ``out=!!str 5`` '5' (a tag), ``out=*a`` an alias.

    Raises:
        ValueError: naming the item and how to quote it.
    """
    import json
    import shlex

    text = raw.strip()
    why = None
    if parsed is _UNPARSED:  # before parsing: an alias is an error there, named without the fix
        if text[:1] in ("&", "*", "!"):
            why = {"&": "an anchor", "*": "an alias", "!": "a tag"}[text[0]]
            why = f"YAML reads a value starting with {text[0]!r} as {why}, not as text"
    elif "#" in text and _after_the_value(text):
        # read where YAML's value ends, not looked for in the value: 'out=runs/#1 #2' kept a '#' and lost ' #2'
        # without a word, and a quoted '\t#' or an alias repeating a '#' hid a comment from a count of them
        why = "YAML reads ' #' and what follows it as a comment, dropped from the value"
    if why:
        # the advice in shell single quotes, which expand nothing (in double quotes an interactive bash expands
        # the '!!' of a tag, and '$' or '"' in the text broke it): the text as a YAML (JSON) double-quoted string
        # inside them, or, when the text holds a "'", the whole argument quoted for the shell
        if "'" not in text:
            advice = f"'{key}={json.dumps(text, ensure_ascii=False)}'"
        else:
            advice = shlex.quote(f"{key}='{text.replace(chr(39), chr(39) * 2)}'")
        raise ValueError(f"--set {item}: not a valid value ({why}); to set the text, quote it: --set {advice}")


def _add_override(changes: dict, key: str, value) -> None:
    """Set ``key`` in ``changes`` as the last of them (a key given again is applied in its new place). A section
    given as a mapping (``ppo={epochs: 3}``) is merged into the section by :func:`config_from_dict`; given again,
    the earlier ``--set`` of that section (the mapping, and ``ppo.epochs=2`` items) are folded into it first, so
    none of their keys is dropped and the later value of a key wins."""
    import dataclasses
    import typing

    from xlard.train.config import TrainConfig

    section = isinstance(value, dict) and dataclasses.is_dataclass(typing.get_type_hints(TrainConfig).get(key))
    if section:
        earlier = changes.pop(key, None)
        merged = dict(earlier) if isinstance(earlier, dict) else {}
        for dotted in [k for k in changes if k.startswith(key + ".")]:  # set after the earlier mapping: they win
            parts = dotted.split(".")[1:]
            if len(parts) == 1:
                merged[parts[0]] = changes.pop(dotted)
            elif isinstance(merged.get(parts[0]), dict):  # inside a field the earlier mapping replaced
                node = merged[parts[0]] = dict(merged[parts[0]])
                for p in parts[1:-1]:
                    node = node.setdefault(p, {})
                    if not isinstance(node, dict):
                        break
                else:
                    node[parts[-1]] = changes.pop(dotted)
        value = {**merged, **value} if earlier is not None or merged else value
    else:
        changes.pop(key, None)
    changes[key] = value


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
