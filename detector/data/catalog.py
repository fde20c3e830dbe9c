"""Name -> dataset registries: ``DatasetCatalog`` (how to load a dataset) and ``MetadataCatalog``
(what it is: classes, id maps, files)."""
import difflib
import reprlib
from typing import Any, Callable, Dict, List

__all__ = ["DatasetCatalog", "MetadataCatalog", "Metadata", "DatasetNotFoundError"]


class DatasetNotFoundError(KeyError):
    """A dataset name that is not registered; the message suggests close registered names."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


def _close_names(name: str, names: List[str]) -> str:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    return f"registered: {sorted(names)}"


class _DatasetCatalog:
    """Maps a dataset name to a function ``fn() -> list[dict]`` that loads its dataset dicts
    (format in docs/architecture.md). Loading is lazy: ``get`` calls the function every time."""

    def __init__(self):
        self._loaders: Dict[str, Callable[[], List[dict]]] = {}

    def register(self, name: str, fn: Callable[[], List[dict]]) -> None:
        """Register ``fn`` (no arguments, returns list[dict]) under ``name``; names are unique."""
        if not callable(fn):
            raise TypeError(
                f"DatasetCatalog.register('{name}'): expected a callable, got {type(fn)}"
            )
        if name in self._loaders:
            raise ValueError(f"Dataset '{name}' is already registered")
        self._loaders[name] = fn

    def get(self, name: str) -> List[dict]:
        """Load and return the dataset dicts of ``name``."""
        try:
            fn = self._loaders[name]
        except KeyError:
            raise DatasetNotFoundError(
                f"Dataset '{name}' is not registered; {_close_names(name, list(self._loaders))}"
            ) from None
        dicts = fn()
        if not isinstance(dicts, list):
            raise TypeError(f"Loader of dataset '{name}' returned {type(dicts).__name__}, not list")
        return dicts

    def list(self) -> List[str]:
        """Registered names, in registration order."""
        return list(self._loaders)

    def remove(self, name: str) -> None:
        """Unregister ``name`` (a KeyError if absent)."""
        self._loaders.pop(name)

    def __contains__(self, name: str) -> bool:
        return name in self._loaders


class Metadata:
    """Attribute namespace of one dataset (``thing_classes``, ``thing_dataset_id_to_contiguous_id``,
    ``thing_contiguous_id_to_dataset_id``, ``json_file``, ``image_root``, ``evaluator_type``...).

    A field, once set, may only be set again to an equal value: two sources disagreeing about a
    dataset is an error, not a silent overwrite. ``set_lazy`` defines a field computed on every
    access (paths resolved from environment variables at use time)."""

    def __init__(self, name: str):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "_lazy", {})

    def __getattr__(self, key: str) -> Any:
        # only called for missing attributes; go through __dict__ to stay safe during unpickling
        lazy = self.__dict__.get("_lazy", {})
        if key in lazy:
            return lazy[key]()
        if key.startswith("__"):
            raise AttributeError(key)
        fields = sorted(k for k in list(self.__dict__) + list(lazy) if not k.startswith("_"))
        raise AttributeError(
            f"Metadata of dataset '{self.__dict__.get('name')}' has no field '{key}'; "
            f"available: {fields}"
        )

    def __setattr__(self, key: str, value: Any) -> None:
        if key in self.__dict__ or key in self._lazy:
            old = getattr(self, key)
            if old != value:
                short = reprlib.Repr()
                short.maxlist = short.maxdict = 6
                raise ValueError(
                    f"Metadata field '{key}' of dataset '{self.name}' is already "
                    f"{short.repr(old)}; refusing to change it to {short.repr(value)}"
                )
            return
        object.__setattr__(self, key, value)

    def set(self, **kwargs: Any) -> "Metadata":
        """Set several fields at once; returns self."""
        for k, v in kwargs.items():
            setattr(self, k, v)
        return self

    def set_lazy(self, key: str, fn: Callable[[], Any]) -> "Metadata":
        """Make ``key`` a field computed by ``fn()`` on each access."""
        if key in self.__dict__ or key in self._lazy:
            raise ValueError(f"Metadata field '{key}' of dataset '{self.name}' is already set")
        self._lazy[key] = fn
        return self

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return getattr(self, key)
        except AttributeError:
            return default

    def as_dict(self) -> Dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        out.update({k: fn() for k, fn in self._lazy.items()})
        return out

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items() if k[0] != "_")
        return f"Metadata({fields})"


class _MetadataCatalog:
    """Maps a dataset name to its ``Metadata``; ``get`` creates an empty one on first use."""

    def __init__(self):
        self._metas: Dict[str, Metadata] = {}

    def get(self, name: str) -> Metadata:
        if name not in self._metas:
            self._metas[name] = Metadata(name)
        return self._metas[name]

    def list(self) -> List[str]:
        return list(self._metas)

    def remove(self, name: str) -> None:
        self._metas.pop(name)

    def __contains__(self, name: str) -> bool:
        return name in self._metas


DatasetCatalog = _DatasetCatalog()
MetadataCatalog = _MetadataCatalog()
