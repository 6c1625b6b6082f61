"""Read the parameters of a TorchScript archive (e.g. OpenAI's ``ViT-B-16.pt``) without running it.

A TorchScript file is a zip archive::

    <root>/data.pkl          the module tree, pickled: one object per module, its attributes in a dict
    <root>/data/<key>        raw little-endian bytes of every tensor storage
    <root>/code/__torch__/   the modules' TorchScript source; each class declares
                             ``__parameters__ = [...]`` and ``__buffers__ = [...]``
    <root>/constants.pkl, <root>/version, ...

``torch.jit.load`` would compile and run the archive's code. Instead, `read_torchscript_state`:

1. reads the ``__parameters__`` / ``__buffers__`` declarations of every class from the ``code/``
   text with a regular expression and ``ast.literal_eval`` (no code is compiled or run);
2. unpickles ``data.pkl`` with a restricted unpickler that resolves only four kinds of globals:
   the archive's own module classes (``__torch__.*``, replaced by inert record objects),
   ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter`` (replaced by a function that views the
   storage bytes with ``as_strided``), ``torch.<Type>Storage`` (a dtype) and ``collections.OrderedDict``.
   Any other global raises `CheckpointError` naming it;
3. walks the module tree and keeps the attributes each class declares as parameters or buffers, under
   dotted names, which is what ``torch.jit.load(path).state_dict()`` returns.
"""

from __future__ import annotations

import ast
import collections
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from .safe import CheckpointError

__all__ = ["is_torchscript_archive", "read_torchscript_state"]

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_CLASS = re.compile(r"^class (\w+)\(")
_DECL = re.compile(r"^\s+__(parameters|buffers)__\s*=\s*(\[.*\])\s*$")


def is_torchscript_archive(path: str | Path) -> bool:
    """True for a zip archive with TorchScript code (``<root>/code/``), not a plain ``torch.save`` zip."""
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/__torch__/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


class _ScriptModule:
    """An inert stand-in for one module object of the archive: its class name and attribute dict."""

    qualname = "?"

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise CheckpointError(f"TorchScript object {self.qualname} has a custom state ({type(state).__name__}); "
                                  "only plain modules are supported")
        self.attrs = state


class _Storage:
    def __init__(self, flat: torch.Tensor) -> None:
        self.flat = flat


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple, stride: tuple, *_: Any) -> torch.Tensor:
    return storage.flat.as_strided(tuple(size), tuple(stride), offset).clone()


def _rebuild_parameter(data: torch.Tensor, *_: Any) -> torch.Tensor:
    return data


def _declarations(z: zipfile.ZipFile, root: str) -> dict[str, set[str]]:
    """``{"__torch__.a.b.Class": {declared parameter and buffer names}}`` from the archive's code text."""
    decl: dict[str, set[str]] = {}
    code = f"{root}/code/"
    for name in z.namelist():
        if not (name.startswith(code) and name.endswith(".py")):
            continue
        module = name[len(code):-3].replace("/", ".")
        current = None
        for line in z.read(name).decode("utf-8", errors="replace").splitlines():
            m = _CLASS.match(line)
            if m:
                current = f"{module}.{m.group(1)}"
                decl.setdefault(current, set())
                continue
            d = _DECL.match(line)
            if d and current is not None:
                decl[current].update(str(x) for x in ast.literal_eval(d.group(2)))
    return decl


def read_torchscript_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict (parameters and buffers, dotted names) of a TorchScript archive, read as data only."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"TorchScript file not found: {path}")
    try:
        z = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise CheckpointError(f"{path}: not a TorchScript archive (not a zip file)") from None
    with z:
        pkl = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkl or not is_torchscript_archive(path):
            raise CheckpointError(f"{path}: not a TorchScript archive (no <root>/data.pkl with <root>/code/)")
        root = pkl[0].split("/")[0]
        decl = _declarations(z, root)
        classes: dict[str, type] = {}
        storages: dict[str, _Storage] = {}

        class Unpickler(pickle.Unpickler):
            def find_class(self, module: str, name: str) -> Any:
                qual = f"{module}.{name}"
                if module.startswith("__torch__"):
                    if qual not in classes:
                        classes[qual] = type(name, (_ScriptModule,), {"qualname": qual})
                    return classes[qual]
                if module == "torch._utils" and name == "_rebuild_tensor_v2":
                    return _rebuild_tensor
                if module == "torch._utils" and name == "_rebuild_parameter":
                    return _rebuild_parameter
                if module == "torch" and name in _STORAGE_DTYPES:
                    return _STORAGE_DTYPES[name]
                if module == "collections" and name == "OrderedDict":
                    return collections.OrderedDict
                raise CheckpointError(f"{path}: refusing to unpickle {qual} from the TorchScript archive; "
                                      "itmzoo reads only module records and tensors")

            def persistent_load(self, pid: Any) -> _Storage:
                if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
                    raise CheckpointError(f"{path}: unexpected persistent id {pid!r} in data.pkl")
                _, dtype, key, _location, numel = pid[:5]
                if key not in storages:
                    raw = z.read(f"{root}/data/{key}")
                    flat = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
                    if flat.numel() != numel:
                        raise CheckpointError(f"{path}: storage {key} holds {flat.numel()} values, expected {numel}")
                    storages[key] = _Storage(flat)
                return storages[key]

        with z.open(pkl[0]) as f:
            top = Unpickler(f).load()
    if not isinstance(top, _ScriptModule):
        raise CheckpointError(f"{path}: data.pkl does not hold a module")
    state: dict[str, torch.Tensor] = {}

    def walk(obj: _ScriptModule, prefix: str) -> None:
        declared = decl.get(obj.qualname)
        if declared is None:
            raise CheckpointError(f"{path}: no code declares class {obj.qualname}")
        for k, v in obj.attrs.items():
            if isinstance(v, _ScriptModule):
                walk(v, f"{prefix}{k}.")
            elif k in declared and isinstance(v, torch.Tensor):
                state[prefix + k] = v

    walk(top, "")
    return state
