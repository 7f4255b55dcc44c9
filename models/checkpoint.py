"""Checkpoint I/O: `model.safetensors` + `config.json`, and the training state for resuming.

Nothing here unpickles: weights and optimizer tensors go through safetensors, everything else
through JSON. A checkpoint directory is written whole or not at all: the new one is staged in a
sibling `<dir>.tmp-*`, the old one is renamed to `<dir>.old-*`, the new one renamed in, the old one
deleted. A crash between the two renames leaves only `<dir>.old-*`, which the next load or save
renames back; a crash at any other point leaves `<dir>` old or new and complete. One writer per
directory at a time.

Layout of a directory:
    model.safetensors           state dicts, keys "<name>.<param>" for a dict of modules
    config.json                 the config, plus format, format_version and (optional) extra
    training_state.safetensors  optimizer and generator tensors (save_training_state)
    training_state.json         the rest of the optimizer state, rng states, step
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FORMAT = "foresight-checkpoint"
TRAINING_FORMAT = "foresight-training-state"
FORMAT_VERSION = 1
MODEL_FILE, CONFIG_FILE = "model.safetensors", "config.json"
STATE_FILE, STATE_JSON = "training_state.safetensors", "training_state.json"
_KNOWN = {MODEL_FILE, CONFIG_FILE, STATE_FILE, STATE_JSON}

Modules = Mapping[str, torch.nn.Module] | torch.nn.Module


class CheckpointError(ValueError):
    """A checkpoint that is missing, foreign, corrupt, too new, or does not fit the model."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint (or no training state) where one was asked for: resume code may start fresh."""


# ----------------------------------------------------------------------------- weights + config

def save_checkpoint(directory: str | os.PathLike, modules: Modules, config: Mapping[str, Any],
                    extra: Mapping[str, Any] | None = None) -> Path:
    """Write the modules' state dicts and `config` to `directory`, replacing it atomically.

    A dict of modules is flattened with prefixes "<name>."; a single module is stored unprefixed.
    Any training state already in `directory` is dropped, since it belongs to the old weights:
    call `save_training_state` after this. Returns the directory.
    """
    state = _flat_state(modules)
    config = dict(config)
    for key in ("format", "format_version", "extra"):
        if key in config:
            raise CheckpointError(f"config key {key!r} is reserved by the checkpoint format; rename it")
    meta = {**config, "format": FORMAT, "format_version": FORMAT_VERSION}
    if extra is not None:
        meta["extra"] = dict(extra)
    text = _to_json(meta, "config/extra")  # fail before touching the disk

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(text)

    return _replace_dir(directory, write, keep=())


def load_checkpoint(directory: str | os.PathLike, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint: `(state, config)`, where config is config.json as written (the config
    plus format, format_version and extra when given)."""
    d = _existing_dir(directory, "checkpoint")
    config = _read_json(d / CONFIG_FILE, FORMAT, "is it a directory written by save_checkpoint?")
    return _read_tensors(d / MODEL_FILE, device), config


def load_into(modules: Modules, state: Mapping[str, torch.Tensor],
              strict: bool = True) -> tuple[list[str], list[str]]:
    """Load a flat state (from `load_checkpoint`) into `modules`, split by the "<name>." prefixes.

    With strict=True, missing or unexpected keys raise before any module is touched; otherwise
    they are returned as `(missing, unexpected)`.
    """
    named = _named(modules)
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in named}
    unexpected = []
    for key, value in state.items():
        name, _, rest = key.partition(".") if None not in named else (None, "", key)
        if name in parts and rest:
            parts[name][rest] = value
        else:
            unexpected.append(key)
    missing = []
    for name, module in named.items():
        want = set(module.state_dict())
        missing += [_join(name, k) for k in sorted(want - set(parts[name]))]
        unexpected += [_join(name, k) for k in sorted(set(parts[name]) - want)]
    unexpected.sort()
    if strict and (missing or unexpected):
        raise CheckpointError("the checkpoint does not fit the model: "
                              f"missing keys {_short(missing)}; unexpected keys {_short(unexpected)}. "
                              "Build the model from the checkpoint's config.json, or pass strict=False")
    for name, module in named.items():
        try:
            module.load_state_dict(parts[name], strict=False)
        except RuntimeError as e:  # shape mismatches
            raise CheckpointError(f"could not load {name or 'the model'}: {e}") from e
    return missing, unexpected


def load_model(directory: str | os.PathLike, kind: str, build: Callable[[dict], torch.nn.Module]) -> torch.nn.Module:
    """Rebuild a model saved as `save_checkpoint(directory, {kind: model}, {"kind": kind, "model": cfg})`.

    `build` maps the saved model config (a dict) to a fresh module; the weights are then loaded
    strictly and the module returned in eval mode.
    """
    state, config = load_checkpoint(directory)
    if config.get("kind") != kind:
        raise CheckpointError(f"{directory} holds a {config.get('kind')!r} checkpoint, not a {kind!r} one")
    try:
        model = build(dict(config["model"]))
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{directory}/config.json does not describe a {kind} this code can build ({e}); "
                              "was it written by another version of Foresight?") from e
    load_into({kind: model}, state)
    return model.eval()


# ----------------------------------------------------------------------------- training state

@dataclass
class TrainingState:
    """What `load_training_state` returns; `optimizer_state` fits `optimizer.load_state_dict`."""

    optimizer_state: dict
    rng_states: dict[str, Any]  # torch: uint8 tensor; numpy: the bit_generator.state dict
    step: int


def save_training_state(directory: str | os.PathLike, optimizer_state: Mapping, rng_states: Mapping[str, Any],
                        step: int) -> Path:
    """Write what resuming needs (no pickle) beside the checkpoint in `directory`, atomically.

    `optimizer_state` is `optimizer.state_dict()`. `rng_states` maps names to `torch.Generator`s or
    `np.random.Generator`s (their states are taken) or to states already taken. Tensors go to
    training_state.safetensors, all else (hyper-parameters, step, numpy states) to JSON.
    """
    tensors: dict[str, torch.Tensor] = {}
    rng = {k: _rng_state(v) for k, v in rng_states.items()}
    meta = {"format": TRAINING_FORMAT, "format_version": FORMAT_VERSION, "step": int(step),
            "optimizer": _encode(dict(optimizer_state), tensors, "optimizer"), "rng": _encode(rng, tensors, "rng")}
    text = _to_json(meta, "training state")
    tensors = _unshared(tensors)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / STATE_FILE))
        (tmp / STATE_JSON).write_text(text)

    return _replace_dir(directory, write, keep=(MODEL_FILE, CONFIG_FILE))


def load_training_state(directory: str | os.PathLike,
                        generators: Mapping[str, Any] | None = None) -> TrainingState:
    """Read the state `save_training_state` wrote; when `generators` (name -> torch.Generator or
    np.random.Generator) is given, restore their states in place."""
    d = _existing_dir(directory, "training state")
    meta = _read_json(d / STATE_JSON, TRAINING_FORMAT, "was save_training_state called for this directory?")
    tensors = _read_tensors(d / STATE_FILE, "cpu")
    out = TrainingState(_decode(meta["optimizer"], tensors), _decode(meta["rng"], tensors), int(meta["step"]))
    for name, gen in (generators or {}).items():
        if name not in out.rng_states:
            raise CheckpointError(f"{d / STATE_JSON} has no rng state {name!r} (it has {sorted(out.rng_states)})")
        if isinstance(gen, torch.Generator):
            gen.set_state(out.rng_states[name])
        elif isinstance(gen, np.random.Generator):
            gen.bit_generator.state = out.rng_states[name]
        else:
            raise TypeError(f"generators[{name!r}] is a {type(gen).__name__}; pass a torch.Generator "
                            "or an np.random.Generator")
    return out


def _rng_state(gen: Any) -> Any:
    if isinstance(gen, torch.Generator):
        return gen.get_state()
    if isinstance(gen, np.random.Generator):
        return gen.bit_generator.state
    return gen


def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """A JSON-safe copy of `obj`; tensors move to `tensors` and leave a {"__tensor__": key} behind.
    Tuples, int-keyed dicts and numpy arrays are tagged so that `_decode` restores them exactly."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        if all(isinstance(k, int) and not isinstance(k, bool) for k in obj):
            return {"__intdict__": {str(k): _encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}}
    raise CheckpointError(f"cannot store {path} ({type(obj).__name__}) without pickle; "
                          "use tensors, numbers, strings, lists and dicts with str or int keys")


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return np.array(obj["__ndarray__"], dtype=obj["dtype"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__intdict__" in obj:
        return {int(k): _decode(v, tensors) for k, v in obj["__intdict__"].items()}
    return {k: _decode(v, tensors) for k, v in obj.items()}


# ----------------------------------------------------------------------------- helpers

def _named(modules: Modules) -> dict[str | None, torch.nn.Module]:
    if isinstance(modules, torch.nn.Module):
        return {None: modules}
    if not isinstance(modules, Mapping) or not modules:
        raise TypeError("modules must be an nn.Module or a non-empty dict of name -> nn.Module")
    for name, m in modules.items():
        if not isinstance(name, str) or not name or "." in name:
            raise CheckpointError(f"module name {name!r} must be a non-empty str without dots "
                                  "(it becomes a key prefix)")
        if not isinstance(m, torch.nn.Module):
            raise TypeError(f"modules[{name!r}] is a {type(m).__name__}, not an nn.Module")
    return dict(modules)


def _join(name: str | None, key: str) -> str:
    return key if name is None else f"{name}.{key}"


def _flat_state(modules: Modules) -> dict[str, torch.Tensor]:
    flat = {_join(name, k): v.detach().cpu()
            for name, m in _named(modules).items() for k, v in m.state_dict().items()}
    return _unshared(flat)


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors with no storage in common (safetensors refuses shared storage). Tied
    weights are thus stored twice; `load_state_dict` copies both into the one tied parameter."""
    seen, out = set(), {}
    for k, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        out[k] = t.clone(memory_format=torch.contiguous_format) if ptr in seen else t.contiguous()
        seen.add(ptr)
    return out


def _short(keys: list[str], n: int = 10) -> str:
    if not keys:
        return "none"
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _to_json(obj: Any, what: str) -> str:
    def default(o: Any) -> Any:
        if isinstance(o, (np.generic, torch.Tensor)) and getattr(o, "ndim", 0) == 0:
            return o.item()
        if isinstance(o, os.PathLike):
            return os.fspath(o)
        raise TypeError(f"{type(o).__name__} is not JSON-serialisable")
    try:
        return json.dumps(obj, indent=2, default=default)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{what} must be JSON-safe (numbers, strings, lists, dicts): {e}") from e


def _read_json(path: Path, fmt: str, hint: str) -> dict:
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path} is missing; {hint}")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the file is corrupt, save again") from e
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path} is not a Foresight file (format {found!r}, expected {fmt!r}); {hint}")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format_version {version!r}, newer than this code reads "
                              f"({FORMAT_VERSION}); update Foresight to load it")
    return meta


def _read_tensors(path: Path, device: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path} is missing; the checkpoint is incomplete, save it again")
    try:
        return load_file(str(path), device=device)
    except Exception as e:  # SafetensorError, OSError, ...: the library's types vary by version
        raise CheckpointError(f"{path} is corrupt or truncated ({type(e).__name__}: {e}); "
                              "save again or use an earlier checkpoint") from e


def _siblings(d: Path, tag: str) -> list[Path]:
    return [p for p in d.parent.glob(f"{glob.escape(d.name)}.{tag}-*") if p.is_dir()] if d.parent.is_dir() else []


def _recover(d: Path) -> None:
    """Undo a crash between the two renames of `_replace_dir`: put the old checkpoint back."""
    if not d.exists():
        olds = _siblings(d, "old")
        if olds:
            old = max(olds, key=lambda p: p.stat().st_mtime)
            try:
                os.rename(old, d)
            except FileNotFoundError:  # another process recovered it first
                pass


def _existing_dir(directory: str | os.PathLike, what: str) -> Path:
    d = Path(os.path.abspath(directory))
    _recover(d)
    if not d.exists():
        raise CheckpointNotFoundError(f"no {what} at {d}: the directory does not exist")
    if not d.is_dir():
        raise CheckpointError(f"{d} is a file, not a {what} directory")
    return d


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(directory: str | os.PathLike, write: Callable[[Path], None], keep: tuple[str, ...]) -> Path:
    """Stage a new `d` in a sibling with `write` (plus the `keep` files of the current `d`, hard-
    linked), then swap it in. See the module docstring for why every crash point is safe."""
    d = Path(os.path.abspath(directory))
    d.parent.mkdir(parents=True, exist_ok=True)
    _recover(d)
    if d.exists():
        if not d.is_dir():
            raise CheckpointError(f"{d} is a file; save the checkpoint to a directory path")
        foreign = sorted(p.name for p in d.iterdir() if p.name not in _KNOWN)
        if foreign:
            raise CheckpointError(f"{d} holds files that are not part of a checkpoint ({_short(foreign, 5)}); "
                                  "it will be replaced whole, so save into a new or empty directory")
    for stale in _siblings(d, "tmp") + (_siblings(d, "old") if d.exists() else []):
        shutil.rmtree(stale, ignore_errors=True)  # left by a crashed save; `d` is complete
    tmp = Path(tempfile.mkdtemp(prefix=f"{d.name}.tmp-", dir=d.parent))
    old = d.with_name(f"{d.name}.old-{secrets.token_hex(4)}")
    try:
        for name in keep:
            if (d / name).is_file():
                try:
                    os.link(d / name, tmp / name)  # files are never modified in place: sharing is safe
                except OSError:
                    shutil.copy2(d / name, tmp / name)
        write(tmp)
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        if d.exists():
            os.rename(d, old)
            os.rename(tmp, d)  # a crash just before this leaves only `old`: `_recover` restores it
            shutil.rmtree(old)
        else:
            os.rename(tmp, d)
        _fsync(d.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _recover(d)
        raise
    return d
