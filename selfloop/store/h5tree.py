"""Pytrees in h5py groups: one checksummed dataset per leaf, named by its pytree path.

Generic storage with no selfloop imports: checkpoints and optimizer files
both keep their weights this way. Every dataset carries the CRC-32 of its
bytes, checked on every read, so a flipped bit is named by dataset; reading a
tree checks each leaf's name, shape and dtype against a template.
"""

from __future__ import annotations

import zlib
from typing import Any

import h5py
import jax
import numpy as np

CHECKSUM = "crc32"  # dataset attribute: CRC-32 of the data's bytes


class StoredDataError(RuntimeError):
    """Stored data that is missing, misshapen or corrupt; the message names the file and dataset."""


def _key_name(key: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    raise TypeError(f"unsupported pytree key {key!r}")


def tree_paths(tree: Any) -> list[tuple[str, Any]]:
    """(dataset name, leaf) for every leaf: the pytree path joined by '/'."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [("/".join(_key_name(k) for k in path) or "value", leaf) for path, leaf in leaves]


def _crc32(data: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(data).tobytes())


def write_dataset(group: h5py.Group, name: str, data: Any) -> h5py.Dataset:
    """A dataset with the CRC-32 of its bytes, which every read verifies."""
    data = np.asarray(data)
    dataset = group.create_dataset(name, data=data)
    dataset.attrs[CHECKSUM] = _crc32(data)
    return dataset


def read_dataset(dataset: h5py.Dataset, where: str) -> np.ndarray:
    """The dataset's data; StoredDataError if it does not match its checksum
    (datasets written before checksums have none to check)."""
    data = dataset[()]
    if CHECKSUM in dataset.attrs and int(dataset.attrs[CHECKSUM]) != _crc32(data):
        raise StoredDataError(f"{where}: {dataset.name} does not match its checksum (the file is corrupt)")
    return data


def write_tree(group: h5py.Group, name: str, tree: Any, description: str) -> None:
    sub = group.create_group(name)
    sub.attrs["description"] = description
    for path, leaf in tree_paths(tree):
        write_dataset(sub, path, leaf)


def read_tree(group: h5py.Group, name: str, template: Any, where: str) -> Any:
    """Leaves of ``template``'s structure, read from ``group/name``; shapes and dtypes checked."""
    if name not in group:
        raise StoredDataError(f"{where}: missing group {group.name}/{name}")
    sub = group[name]
    leaves = []
    for path, expected in tree_paths(template):
        key = f"{sub.name}/{path}"
        if path not in sub:
            raise StoredDataError(f"{where}: missing dataset {key}")
        data = read_dataset(sub[path], where)
        if data.shape != tuple(expected.shape) or data.dtype != np.dtype(expected.dtype):
            raise StoredDataError(
                f"{where}: {key} holds {data.dtype}{list(data.shape)}, "
                f"expected {np.dtype(expected.dtype)}{list(expected.shape)}"
            )
        leaves.append(np.asarray(data))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), leaves)


def scalar(value: Any) -> Any:
    """h5py attribute -> plain Python value."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value
