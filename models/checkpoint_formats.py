"""Reading the published checkpoint formats without running any code from them.

Two formats besides safetensors and plain state dicts:

* demucs ``.th`` packages: ``torch.save`` of ``{"klass": <class>, "args": (), "kwargs": {...},
  "state": {name: half tensor}, "training_args": {...}}`` (``demucs/states.py: serialize_model``);
* RoFormer ``.ckpt`` files (Music-Source-Separation-Training, UVR): ``torch.save(model.state_dict())``,
  sometimes wrapped as ``{"state_dict": ...}``.

Both are pickles. Two layers stand between a file and code execution:

1. :func:`pickle_globals` lists every global the pickle names (``GLOBAL``, ``INST``, ``STACK_GLOBAL``
   opcodes, read with :mod:`pickletools`, nothing executed) and :func:`check_globals` refuses a file
   naming anything outside :data:`ALLOWED_GLOBALS` / :data:`ALLOWED_PATTERNS`, before unpickling starts;
2. the file is then read by ``torch.load(weights_only=True)`` with an explicit allow-list: the
   demucs class names map to inert stand-ins (:class:`ClassRef`), never imported, never called.

The architecture is built from the registry entry's own config; the class a package names is only
compared with the one the entry expects (see :func:`read_demucs_package`).
"""

from __future__ import annotations

import fractions
import pickletools
import re
import threading
import zipfile
from pathlib import Path

import torch

from demix.models.base import ModelLoadError

DEMUCS_CLASSES = ("demucs.htdemucs.HTDemucs", "demucs.hdemucs.HDemucs", "demucs.demucs.Demucs")
"""Classes a demucs package may name (as a reference: none is imported or instantiated)."""

ALLOWED_GLOBALS = frozenset(
    {
        "collections.OrderedDict",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
        "torch.Size",
        "fractions.Fraction",  # demucs' segment (Fraction(39, 5)): rebuilt from its string
        *DEMUCS_CLASSES,
    }
)
"""Every global a checkpoint may name; anything else refuses the file before it is unpickled."""

ALLOWED_PATTERNS = (re.compile(r"torch\.[A-Za-z]+Storage"), re.compile(r"torch\.(?:float|bfloat|half|int|uint|bool)\w*"))
"""Storage classes and dtypes that ``torch.save`` names for tensors."""

_LOCK = threading.Lock()  # torch's extra safe globals are process state: one reader at a time


class ClassRef:
    """An inert stand-in for a class a checkpoint names: holds the dotted name, does nothing."""

    qualname = ""

    def __init__(self, *_args, **_kwargs) -> None:  # pragma: no cover - never called by a load
        raise ModelLoadError(f"refusing to build {self.qualname} from a checkpoint")


def _stand_in(name: str) -> type:
    return type(name.rsplit(".", 1)[1], (ClassRef,), {"qualname": name, "__module__": __name__})


_STAND_INS = [(_stand_in(name), name) for name in DEMUCS_CLASSES]


def _pickle_bytes(path: Path) -> bytes:
    """The object pickle of a ``torch.save`` zip file (``<archive>/data.pkl``)."""
    if not zipfile.is_zipfile(path):
        raise ModelLoadError(
            f"cannot read weights {path}: not a torch.save zip file (demix reads the zip format PyTorch writes since "
            "1.6, safetensors, or plain state dicts)"
        )
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(names) != 1:
            raise ModelLoadError(f"cannot read weights {path}: expected one data.pkl in the archive, found {len(names)}")
        return archive.read(names[0])


def pickle_globals(data: bytes) -> list[str]:
    """Dotted names of every global ``data`` (a pickle) refers to, in order, read without unpickling.

    ``STACK_GLOBAL`` takes its module and name from the two values pushed before it (constants or memo
    reads); one whose operands are not strings gives ``"<unresolved>"`` (which no allow-list admits).
    """
    found: list[str] = []
    memo: dict[int, object] = {}
    pushed: list[object] = []  # the values of the last pushes (None for anything not a string)
    for opcode, arg, _pos in pickletools.genops(data):
        name = opcode.name
        if name in ("GLOBAL", "INST"):
            module, attr = str(arg).split(" ", 1)
            found.append(f"{module}.{attr}")
            pushed.append(None)
        elif name == "STACK_GLOBAL":
            module, attr = (pushed[-2:] + [None, None])[:2] if len(pushed) >= 2 else (None, None)
            ok = isinstance(module, str) and isinstance(attr, str)
            found.append(f"{module}.{attr}" if ok else "<unresolved>")
            pushed.append(None)
        elif name in ("MEMOIZE",):
            memo[len(memo)] = pushed[-1] if pushed else None
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = pushed[-1] if pushed else None
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(int(arg)))
        elif opcode.stack_after and not opcode.stack_before and name.endswith(("UNICODE", "STRING")):
            pushed.append(arg)
        elif opcode.stack_after:
            pushed.append(None)
        del pushed[:-4]
    return found


def _allowed(name: str) -> bool:
    return name in ALLOWED_GLOBALS or any(p.fullmatch(name) for p in ALLOWED_PATTERNS)


def check_globals(path: Path) -> list[str]:
    """Refuse ``path`` (``ModelLoadError``) if its pickle names a global outside the allow-list; return them."""
    names = pickle_globals(_pickle_bytes(path))
    refused = sorted({n for n in names if not _allowed(n)})
    if refused:
        raise ModelLoadError(
            f"refusing weights {path}: its pickle refers to {', '.join(refused)}, which a checkpoint of tensors never "
            "needs (a file that names them can run code when unpickled); nothing from it was executed"
        )
    return names


def safe_load(path: Path):
    """``torch.load`` of ``path`` after :func:`check_globals`, with ``weights_only=True`` and demix's allow-list."""
    check_globals(path)
    try:
        with _LOCK, torch.serialization.safe_globals([*_STAND_INS, fractions.Fraction]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - PyTorch's advice (weights_only=False) is never relayed
        raise ModelLoadError(f"cannot read weights {path}: {type(err).__name__} while reading the pickle") from None


def _tensors(state, path: Path, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"weights {path} do not hold {what} of tensors")
    return {str(k): v for k, v in state.items()}


def read_demucs_package(path: Path, *, klass: str, kwargs: dict) -> dict[str, torch.Tensor]:
    """The float32 state dict of a demucs ``.th`` package, checked against what the entry expects.

    The package's ``klass`` must be ``klass`` (a name: nothing is imported) and every architecture
    keyword in ``kwargs`` (the registry entry's config) must equal the package's; training-only keys
    the entry does not name are ignored. Raises ``ModelLoadError`` otherwise.
    """
    package = safe_load(path)
    if not isinstance(package, dict) or not {"klass", "kwargs", "state"} <= set(package):
        raise ModelLoadError(f"weights {path} are not a demucs package (a dict with klass, args, kwargs and state)")
    named = getattr(package["klass"], "qualname", repr(package["klass"]))
    if named != klass:
        raise ModelLoadError(f"weights {path} hold a {named} package; this registry entry expects {klass}")
    theirs = package["kwargs"] if isinstance(package["kwargs"], dict) else {}
    differ = [k for k, v in kwargs.items() if k in theirs and _norm(theirs[k]) != _norm(v)]
    if differ:
        pairs = ", ".join(f"{k}={theirs[k]!r} (expected {kwargs[k]!r})" for k in differ[:4])
        raise ModelLoadError(f"weights {path} were saved for another configuration: {pairs}")
    return {k: v.float() for k, v in _tensors(package["state"], path, "a demucs state").items()}


def _norm(value):
    if isinstance(value, (list, tuple)):
        return [_norm(v) for v in value]
    if isinstance(value, (int, float, fractions.Fraction)) and not isinstance(value, bool):
        return float(value)
    return value


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A RoFormer ``.ckpt`` (or any ``torch.save`` state dict, possibly under ``state_dict``), as float32."""
    state = safe_load(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return {k: v.float() if v.is_floating_point() else v for k, v in _tensors(state, path, "a state dict").items()}
