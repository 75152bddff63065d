"""Name -> class registries filled by class decorators (backbone families, methods)."""

from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T", bound=type)


def registrar(table: dict[str, type], kind: str, attribute: str) -> Callable[[str], Callable[[T], T]]:
    """A decorator factory: `@register(name)` puts the class in `table` under `name`, sets `cls.<attribute> = name`
    and refuses a name registered twice."""

    def register(name: str) -> Callable[[T], T]:
        def add(cls: T) -> T:
            if name in table:
                raise ValueError(f"{kind} {name!r} is registered twice ({table[name].__name__}, {cls.__name__})")
            setattr(cls, attribute, name)
            table[name] = cls
            return cls

        return add

    return register
