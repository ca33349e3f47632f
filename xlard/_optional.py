"""Optional dependencies: import one on use, or fail with one line naming the extra that installs it.

The base install (``pip install xlard``) is torch + numpy and serves
:mod:`xlard.ops`. Everything above the ops imports its heavier dependencies
here, on use, so ``import xlard.<module>`` always works and the first call
that needs a missing package says which ``pip install 'xlard[<extra>]'``
fixes it. :data:`EXTRAS` must agree with ``[project.optional-dependencies]``
in pyproject.toml (tests/test_install_extras.py checks it).
"""
from __future__ import annotations

import importlib
import logging
from types import ModuleType

#: top-level import name -> (pip distribution, the extra of pyproject.toml that declares it)
EXTRAS: dict[str, tuple[str, str]] = {
    "diffusers": ("diffusers", "method"),
    "transformers": ("transformers", "method"),
    "safetensors": ("safetensors", "method"),
    "tqdm": ("tqdm", "method"),
    "PIL": ("pillow", "method"),
    "yaml": ("pyyaml", "method"),  # xlard train's YAML configs
    "huggingface_hub": ("huggingface_hub", "method"),  # the local cache of hub models (diffusers' own dependency)
    "sentencepiece": ("sentencepiece", "method"),  # a SigLIP checkpoint's tokenizer (the clip source)
    "triton": ("triton", "triton"),
}


def missing_message(module: str, user: str, exc: ImportError | None = None) -> str:
    """The one-line message for a missing optional dependency.

    Args:
        module (str): the module that failed to import, e.g. ``"PIL.Image"``.
        user (str): who needs it, e.g. ``"xlard.explain.save_png"``.
        exc (ImportError, optional): the import error; named in the message
            when a package *inside* ``module`` is what is missing.

    Returns:
        str: ``"<user> needs <dist>: pip install 'xlard[<extra>]'"`` (plus the
        inner error when the package is installed but one of its own
        dependencies is not).

    Raises:
        KeyError: ``module`` is not an optional dependency listed in :data:`EXTRAS`.
    """
    top = module.partition(".")[0]
    dist, extra = EXTRAS[top]
    message = f"{user} needs {dist}: pip install 'xlard[{extra}]'"
    inner = getattr(exc, "name", None)
    if exc is not None and inner and inner.partition(".")[0] != top:
        message += f" ({dist} is installed but could not import: {exc})"
    return message


def require(module: str, user: str) -> ModuleType:
    """Import an optional dependency, or raise ImportError naming the extra to install.

    Args:
        module (str): a module of a package listed in :data:`EXTRAS`, e.g.
            ``"diffusers"`` or ``"PIL.Image"``.
        user (str): the function or module that needs it (for the message).

    Returns:
        The imported module.

    Raises:
        ImportError: the package (or one of its own dependencies) is missing;
            the message is one line ending in ``pip install 'xlard[<extra>]'``.

    Example:
        >>> Image = require("PIL.Image", "xlard.explain.save_png")
    """
    if module.partition(".")[0] in ("diffusers", "transformers"):
        quiet_known_notices()
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(missing_message(module, user, exc)) from exc


#: transformers' notice, once per process, when an image processor class (CLIPImageProcessor, ...) is first
#: looked up without torchvision installed: it falls back to its PIL version. diffusers looks them up when it
#: imports its pipeline modules, so the notice came before the first line of every command that loads a
#: pipeline; nothing xlard does depends on which version serves.
TORCHVISION_NOTICE = "requires torchvision (not installed); falling back to"


class _DropTorchvisionNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return TORCHVISION_NOTICE not in record.getMessage()


_NOTICE_FILTER = _DropTorchvisionNotice()


def quiet_known_notices() -> None:
    """Drop :data:`TORCHVISION_NOTICE` (only that message; every other warning of transformers stays). Called
    by :func:`require` for diffusers and transformers, before they import; idempotent."""
    logging.getLogger("transformers.utils.import_utils").addFilter(_NOTICE_FILTER)  # filters are a set
