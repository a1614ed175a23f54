"""Reading checkpoints into built models: safetensors files, single or sharded, copied tensor by tensor
into the model's own parameters (on its device, in its dtype), so that loading never holds a second
copy of the model on the host.
"""

from __future__ import annotations

import glob
import json
import os

import torch
from safetensors import safe_open
from torch import nn

from .errors import DDTreeError


def weight_files(model_dir: str, what: str) -> list[str]:
    """The safetensors files of a model directory: a sharded checkpoint's shards (every one its index
    names must be there) or its single file."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DDTreeError(f"{what}: unusable {index}: {exc}") from None
        missing = [name for name in shards if not os.path.isfile(os.path.join(model_dir, name))]
        if missing:
            raise DDTreeError(f"{what}: shards named in {index} are missing: {', '.join(missing[:3])}")
        return [os.path.join(model_dir, name) for name in shards]
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise DDTreeError(f"{what}: no *.safetensors weights in {model_dir}")
    return files


def checkpoint_views(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of `module` under its checkpoint name, as a view into the module's own parameters
    (fused projections split back into their parts by their state-dict hooks): where a checkpoint's
    tensor is copied straight in."""
    with torch.no_grad():
        return dict(module.state_dict(keep_vars=True))


def whole_parameters(module: nn.Module, views: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, list[str]]]:
    """The parameters that `checkpoint_views` shows only in parts, under their own names, with the names
    of their parts: a checkpoint may hold them whole (transformers' save_pretrained writes a Qwen3-MoE's
    experts stacked, as `mlp.experts.gate_up_proj`, when asked not to keep the original format). A part
    is known by its parameter's storage (under inference mode views keep no `_base`)."""
    own = {param.untyped_storage().data_ptr(): (name, param) for name, param in module.named_parameters()}
    wholes: dict[str, tuple[torch.Tensor, list[str]]] = {}
    for part, view in views.items():
        name, param = own.get(view.untyped_storage().data_ptr(), (None, view))
        if param is not view:
            wholes.setdefault(name, (param, []))[1].append(part)
    return wholes


def load_checkpoint(module: nn.Module, files: list[str], what: str, strip: str = "", optional: tuple[str, ...] = ()) -> None:
    """Copies the tensors of `files` into `module`'s parameters, on their device and in their dtype, one
    tensor at a time from memory-mapped files: the host holds one tensor of the checkpoint at a time.
    `strip`: a prefix the checkpoint's names carry and the module's do not. One clear error for files
    that cannot be read and for weights missing, unexpected or wrongly shaped."""
    views, loaded, unexpected = checkpoint_views(module), set(), []
    targets = {name: (view, [name]) for name, view in views.items()} | whole_parameters(module, views)
    for path in files:
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                keys = list(f.keys())
            for key in keys:
                name = key.removeprefix(strip)
                if name not in targets:
                    unexpected.append(key)
                    continue
                into, covered = targets[name]
                # the file is mapped anew for each tensor: the pages a copy reads leave this process's
                # memory when the mapping closes, so a 16 GB single-file checkpoint never sits in it whole
                with safe_open(path, framework="pt", device="cpu") as f:
                    tensor = f.get_tensor(key)
                    if tensor.shape != into.shape:
                        raise DDTreeError(f"{what} weights do not match its config: {key} is {tuple(tensor.shape)}, "
                                          f"the config makes it {tuple(into.shape)}")
                    with torch.no_grad():
                        into.copy_(tensor)
                    del tensor
                loaded.update(covered)
        except DDTreeError:
            raise
        except Exception as exc:  # safetensors raises its own error type, and OSError for unreadable files
            raise DDTreeError(f"{what}: {path} is not a readable safetensors file ({exc})") from None
    missing = [name for name in views if name not in loaded and name not in optional]
    if missing or unexpected:
        raise DDTreeError(f"{what} weights do not match its config: missing {missing[:4]}, unexpected {unexpected[:4]}")
