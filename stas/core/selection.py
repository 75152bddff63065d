"""Which blocks, steps and step windows a config selects: index ranges resolved and checked against a model."""

from __future__ import annotations

from dataclasses import dataclass

from stas.errors import ConfigError, check_allowed

WINDOW_UNITS = ("fraction", "steps")


def select_indices(value, count: int, path: str, what: str = "block") -> list[int]:
    """The indices 0..count-1 that a selection names: 'all', a list of indices, or a 'start:end' range."""
    if value == "all" or value is None:
        return list(range(count))
    if isinstance(value, str):
        try:
            start, end = (int(x) if x else None for x in value.split(":"))
        except ValueError:
            raise ConfigError(f"{path}={value!r} is not allowed; allowed: all, a list of indices, 'start:end'")
        indices = list(range(count))[slice(start, end)]
        if not indices:
            raise ConfigError(f"{path}={value!r} selects no {what} of {count}")
        return indices
    if isinstance(value, int):
        value = [value]
    indices = [int(x) for x in value]
    if not indices:
        raise ConfigError(f"{path}=[] selects nothing; give at least one {what} index (0..{count - 1}) or 'all'")
    for index in indices:
        if not 0 <= index < count:
            raise ConfigError(f"{path} contains {index}; the model has {what}s 0..{count - 1}")
    return sorted(set(indices))


def steered_layers(layers, num_layers: int) -> list[int]:
    """The block indices a `steer.layers` value names: 'all', a list of indices, or a 'start:end' range."""
    return select_indices(layers, num_layers, "steer.layers")


def window_steps(window, num_steps: int) -> range:
    """The denoising step indices [start, end) of a steering window; fractions are rounded to steps."""
    check_allowed("steer.window.unit", window.unit, WINDOW_UNITS)
    start, end = window.start, window.end
    if not start < end:
        raise ConfigError(f"steer.window start={start!r} must be < end={end!r}")
    if window.unit == "fraction":
        if not (0 <= start and end <= 1):
            raise ConfigError(f"steer.window=[{start}, {end}) must lie within [0, 1] as fractions of the steps")
        return range(round(start * num_steps), round(end * num_steps))
    if start != int(start) or end != int(end) or start < 0 or end > num_steps:
        raise ConfigError(
            f"steer.window=[{start}, {end}) must be whole step indices within [0, {num_steps}] (model.steps={num_steps})"
        )
    return range(int(start), int(end))


@dataclass(frozen=True)
class AnalysisSelection:
    """The blocks and steps stas.analyze captures, and the (block, step) pairs whose per-token magnitudes it keeps."""

    layers: tuple[int, ...]
    steps: tuple[int, ...]
    profile: tuple[tuple[int, int], ...]


def analysis_selection(analysis, num_layers: int, num_steps: int) -> AnalysisSelection:
    """Resolve and check the `analysis` selections against a model of `num_layers` blocks and `num_steps` steps."""
    layers = select_indices(analysis.layers, num_layers, "analysis.layers")
    steps = select_indices(analysis.steps, num_steps, "analysis.steps", what="step")
    if analysis.profile_layers is None:
        profile_layers = [layers[len(layers) // 2]]
    else:
        profile_layers = select_indices(analysis.profile_layers, num_layers, "analysis.profile_layers")
    if analysis.profile_steps is None:
        early = min(steps, key=lambda step: abs(step - round(0.1 * num_steps)))
        profile_steps = sorted({steps[0], early})
    else:
        profile_steps = select_indices(analysis.profile_steps, num_steps, "analysis.profile_steps", what="step")
    for path, chosen, captured in (("analysis.profile_layers", profile_layers, layers),
                                   ("analysis.profile_steps", profile_steps, steps)):
        outside = sorted(set(chosen) - set(captured))
        if outside:
            kind = path.split("_")[1]
            raise ConfigError(f"{path} contains {outside}, which analysis.{kind} does not capture "
                              f"(captured: {captured}); capture them or choose among them")
    return AnalysisSelection(tuple(layers), tuple(steps),
                             tuple((layer, step) for layer in profile_layers for step in profile_steps))


def shard_of(shard) -> tuple[int, int]:
    """(index, count) of this process's shard: shard.index and shard.count (unset: 0 and 1), never the environment."""
    index = 0 if shard.index is None else shard.index
    count = 1 if shard.count is None else shard.count
    if count < 1:
        raise ConfigError(f"shard.count={count!r} must be >= 1")
    if not 0 <= index < count:
        raise ConfigError(f"shard.index={index!r} must lie in [0, shard.count={count})")
    return index, count
