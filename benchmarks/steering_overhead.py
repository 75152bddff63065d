"""STAS's overhead: the same transformer, inputs and steps, vanilla CFG vs CFG + STAS, interleaved in one process.

    python benchmarks/steering_overhead.py                      # CPU: 8-block dim-512 Wan transformer, 4,080 tokens
    python benchmarks/steering_overhead.py --quick              # smoke run: small model, 3 rounds, under a minute
    python benchmarks/steering_overhead.py --device cuda --model wan21_1.3b    # full Wan2.1-1.3B config, bf16
    python benchmarks/steering_overhead.py --device cuda --model cogvideox5b   # full CogVideoX-5B config, bf16
    python benchmarks/steering_overhead.py --compile regional   # compiled vanilla vs compiled STAS (also: full)
    python benchmarks/steering_overhead.py --compile hook       # eager transformers, STAS's hook compiled alone

What runs: a random-init diffusers transformer of the chosen config with planted massive activations
(stas.backbones.tiny.plant_massive_activations, so that auto-detection finds real channels), driven by the denoising loop of
the pipelines without text encoder and VAE: CFG as the pipeline calls it (Wan: a cond call, then an uncond call per
step; CogVideoX: one call on the batch [uncond, cond]), then a flow-matching Euler update. STAS is the real
StasSteerer with the SteerConfig defaults (window [0, 0.4) of the steps, first_frame+boundary tokens, auto MA
channels, every block, both CFG branches), attached and begun exactly as stas.generation does.

Measured, each as interleaved rounds (benchmarks/timing.py):
  in-window   one denoising step inside the steering window (the worst case): vanilla CFG, CFG + STAS, and CFG plus
              one extra forward pass per step (what STG/PAG-style guidance pays; a full pass, its upper bound);
  whole run   a whole sampling run of --steps steps with the default window: vanilla CFG vs CFG + STAS.
On CUDA the steered calls run under torch.cuda.set_sync_debug_mode("error"): a host-device synchronisation in
the steering hook (or anywhere in the steered step) raises instead of passing silently.

--compile regional|full compiles the transformer as model.compile does (stas.backbones.compile_transformer), so
both sides are compiled: vanilla CFG and CFG + STAS each run once untimed first (every graph compiles then), and
the report gives torch.compile's graphs, recompiles and graph breaks of that warm-up and of the timed rounds
after it (which should add none). Hook vs block then times the block's forward and the hook each compiled, as
regional compilation runs them (full compilation traces both into one graph). --compile hook leaves the transformer
eager and compiles only the steering hook (steer.compile_hook=true): hook vs block then times the eager block and
the compiled hook.

The last line printed is `overhead_ratio=<median steered / median vanilla, in-window step>`.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from bench_models import (BenchModel, Denoiser, add_model_arguments, build_transformer, describe, make_inputs,
                          model_record, select_model)
from timing import at_least, benchmark_parser, device_synchronizer, interleave, machine, run_benchmark, table


@dataclass
class Plan:
    """How much to measure: in-window rounds, whole-run rounds and steps."""

    window_rounds: int
    run_rounds: int
    steps: int
    hook_rounds: int
    warmup: int = 1


def default_plan(device: torch.device, quick: bool) -> Plan:
    if quick:
        return Plan(window_rounds=3, run_rounds=3, steps=5, hook_rounds=5)
    if device.type == "cuda":
        return Plan(window_rounds=9, run_rounds=3, steps=10, hook_rounds=30)
    # CPU: a cpu_mid CFG step takes ~10 s on 2 quiet cores and single steps vary by +-5% on a shared VM, hence many
    # rounds; 5 steps keep the window's share of the run (2 of 5 = 0.4, as 20 of 50).
    return Plan(window_rounds=15, run_rounds=3, steps=5, hook_rounds=15)


# ------------------------------------------------------------------------------------------------------ steering


def default_steerer(backbone, compile_hook: bool = False):
    """The real StasSteerer with the SteerConfig defaults (the paper-like setting), its hook compiled alone if
    `compile_hook` (steer.compile_hook)."""
    from omegaconf import OmegaConf

    from stas.config import SteerConfig
    from stas.methods import StasSteerer

    return StasSteerer(backbone, OmegaConf.structured(SteerConfig(compile_hook=compile_hook)))


@contextmanager
def no_sync_allowed(device: torch.device):
    """On CUDA: any host-device synchronisation inside raises (torch.cuda.set_sync_debug_mode('error'))."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@dataclass
class Bench:
    denoiser: Denoiser
    steerer: object
    layout: object
    device: torch.device
    steps: int
    outputs: dict = field(default_factory=dict)

    def vanilla(self, steps: range, extra_pass: bool = False) -> None:
        self.outputs["extra_pass" if extra_pass else "vanilla"] = self.denoiser.run(steps, extra_pass)

    def steered(self, steps: range, check_sync: bool = True) -> None:
        # As stas.generation does: attach around the pipeline call, begin() before it.
        with self.steerer.attach(self.denoiser.transformer):
            self.steerer.begin(self.layout, self.steps, do_cfg=True)
            with no_sync_allowed(self.device) if check_sync else nullcontext():
                self.outputs["steered"] = self.denoiser.run(steps)


def parse_args(argv=None) -> argparse.Namespace:
    parser = benchmark_parser(__doc__, "smoke run: fewer rounds and steps (and a small model)")
    add_model_arguments(parser, "cpu_mid on CPU, cpu_small with --quick, wan21_1.3b on CUDA")
    parser.add_argument("--steps", type=at_least(1),
                        help="steps of the whole sampling run (the window is 40%% of them)")
    parser.add_argument("--window-rounds", type=at_least(1), help="timed rounds of the in-window step")
    parser.add_argument("--run-rounds", type=at_least(1), help="timed rounds of the whole run")
    parser.add_argument("--hook-rounds", type=at_least(1), help="timed rounds of the hook-vs-block comparison")
    parser.add_argument("--compile", choices=["none", "hook", "regional", "full"], default="none",
                        help="torch.compile the transformer as model.compile does, or (hook) only the steering "
                             "hook, as steer.compile_hook=true does (default: none, eager)")
    return parser.parse_args(argv)


def resolve(args) -> tuple[str, BenchModel, Plan, torch.device]:
    name, spec, device = select_model(args, "steering_overhead")
    plan = default_plan(device, args.quick)
    for key in ("steps", "window_rounds", "run_rounds", "hook_rounds"):
        if getattr(args, key) is not None:
            setattr(plan, key, getattr(args, key))
    return name, spec, plan, device


def main(argv=None) -> dict:
    return run_benchmark("steering_overhead.py", argv, parse_args(argv), measure,
                         lambda result: f"overhead_ratio={result['in_window_ratio']:.4f}")


def measure(args) -> dict:
    name, spec, plan, device = resolve(args)

    from stas.backbones import DTYPES, compile_counts, compile_transformer
    from stas.core.layout import TokenLayout
    from stas.core.selection import window_steps

    dtype = DTYPES[spec.dtype]
    transformer, backbone = build_transformer(spec, name, device, dtype, args.seed)
    compile_transformer(transformer, "none" if args.compile == "hook" else args.compile)
    inputs = make_inputs(spec, backbone, transformer, device, dtype, plan.steps, args.seed)
    layout = TokenLayout.for_video(backbone, spec.video[1], spec.video[2], spec.video[0])
    steerer = default_steerer(backbone, compile_hook=args.compile == "hook")
    window = window_steps(steerer.cfg.window, plan.steps)
    if 0 not in window:
        sys.exit(f"steering_overhead: error: the default window is empty at --steps {plan.steps}; use more steps")
    bench = Bench(Denoiser(transformer, backbone, inputs, dtype), steerer, layout, device, plan.steps)
    synchronize = device_synchronizer(device)

    # Lazy caches (token indices, planted biases, CUDA kernels and allocator) and every compiled graph fill here,
    # outside the sync check and the timings.
    compiled_before = compile_counts()
    bench.steered(range(1), check_sync=False)
    bench.vanilla(range(1))
    bench.vanilla(range(1), extra_pass=True)
    compiled_warm = compile_counts()
    one_step, all_steps = range(1), range(plan.steps)
    in_window = interleave({
        "vanilla": lambda: bench.vanilla(one_step),
        "stas": lambda: bench.steered(one_step),
        "extra_pass": lambda: bench.vanilla(one_step, extra_pass=True),
    }, repeats=plan.window_rounds, warmup=plan.warmup, synchronize=synchronize)
    record_in_window = steerer.record()
    changed = not torch.equal(bench.outputs["steered"], bench.outputs["vanilla"])
    whole_run = interleave({
        "vanilla": lambda: bench.vanilla(all_steps),
        "stas": lambda: bench.steered(all_steps),
    }, repeats=plan.run_rounds, warmup=0, synchronize=synchronize)
    record_whole_run = steerer.record()
    compiled_after = compile_counts()
    hook_vs_block = interleave(hook_and_block_cases(bench, args.compile), repeats=plan.hook_rounds, warmup=1,
                               synchronize=synchronize)

    result = {
        "benchmark": "steering_overhead",
        "machine": machine(device),
        "model": model_record(name, spec, backbone, layout, device),
        "compile": {"mode": args.compile, "warmup": _added(compiled_before, compiled_warm),
                    "timed_rounds": _added(compiled_warm, compiled_after)},
        "steer": {"window_steps": [window.start, window.stop], "of_steps": plan.steps,
                  "record_in_window_step": record_in_window, "record_whole_run": record_whole_run,
                  "steering_changed_latents": changed},
        "in_window": {k: t.as_dict() for k, t in in_window.items()},
        "whole_run": {k: t.as_dict() for k, t in whole_run.items()},
        "hook_vs_block": {k: t.as_dict() for k, t in hook_vs_block.items()},
        "ratios": {
            "in_window": in_window["stas"].ratios_to(in_window["vanilla"]),
            "extra_pass": in_window["extra_pass"].ratios_to(in_window["vanilla"]),
            "whole_run": whole_run["stas"].ratios_to(whole_run["vanilla"]),
            "hook_share_of_block": hook_vs_block["hook"].ratios_to(hook_vs_block["block"]),
        },
        "in_window_ratio": in_window["stas"].ratio_to(in_window["vanilla"]),  # the headline: ratio of medians
    }
    print(report(result, in_window, whole_run, hook_vs_block, device))
    return result


def _added(before: dict, after: dict) -> dict:
    """What torch.compile did between two readings of compile_counts: graphs, recompiles, graph breaks."""
    return {key: after[key] - before[key] for key in before}


def hook_and_block_cases(bench: Bench, compile_mode: str = "none") -> dict:
    """The steering hook alone vs the forward of the block it follows, on that block's real inputs and output.

    Both run on the last block (whose input carries the planted MAs of all blocks before it), in the first call
    of an in-window step; the block's own forward hooks (planting, steering) are bypassed. Their ratio is the
    hook's share of the block's time, free of the noise of whole steps. Compiled (`compile_mode` other than none),
    each is compiled on its own and run once before timing.
    """
    from stas.methods.steering_hook import LayerSteering

    transformer, backbone, steerer = bench.denoiser.transformer, bench.denoiser.backbone, bench.steerer
    index = backbone.num_layers - 1
    block = backbone.blocks(transformer)[index]
    captured = {}
    handle = block.register_forward_pre_hook(lambda m, a, k: captured.setdefault("call", (a, k)), with_kwargs=True)
    try:
        bench.vanilla(range(1))
    finally:
        handle.remove()
    args, kwargs = captured["call"]
    with torch.inference_mode():
        output = block.forward(*args, **kwargs)
    hook = LayerSteering(steerer, index, steerer.channels[index])
    if hook.channels is not None:  # fixed channels: on the device before the hook runs (compiled or not)
        hook.device_channels = hook.channels.to(bench.device)
    steerer.begin(bench.layout, bench.steps, do_cfg=True)
    # The step's first transformer call; the pre-hook reads the call's batch and device from its latents, for which
    # the block's input hidden states stand in.
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    steerer.tracker.on_transformer_call(transformer, (), {"hidden_states": hidden})

    forward, steer = block.forward, hook
    if compile_mode in ("regional", "full"):
        forward = torch.compile(block.forward)
    if compile_mode != "none":
        steer = torch.compile(hook)

    def run_block():
        with torch.inference_mode():
            forward(*args, **kwargs)

    def run_hook(check_sync: bool = True):
        with torch.inference_mode(), no_sync_allowed(bench.device) if check_sync else nullcontext():
            steer(block, args, output)

    run_block()
    run_hook(check_sync=False)  # compiles here, outside the sync check
    return {"block": run_block, "hook": run_hook}


def report(result: dict, in_window: dict, whole_run: dict, hook_vs_block: dict, device: torch.device) -> str:
    model, steer, ratios = result["model"], result["steer"], result["ratios"]
    record = steer["record_in_window_step"]
    cpu_time = device.type == "cpu"
    compiled = result["compile"]
    lines = [
        f"steering overhead: {describe(model)}",
        f"  machine: {json.dumps(result['machine'])}",
        f"  torch.compile: {compiled['mode']}" + ("" if compiled["mode"] == "none" else
            f"; warm-up (one untimed vanilla, STAS and extra-pass step): {_counts(compiled['warmup'])}; timed rounds "
            f"after it: {_counts(compiled['timed_rounds'])}"),
        f"  STAS (SteerConfig defaults): window steps [{steer['window_steps'][0]}, {steer['window_steps'][1]}) of "
        f"{steer['of_steps']}, {record['tokens']} of {model['tokens']} tokens; per step {record['hook_calls']} "
        f"hook calls ({len(record['layers'])} blocks, branches {', '.join(record['branches'])}); auto-detected MA "
        f"channels per call: {record['channels_mean']:.2f} (at most {record['channels_max']}); "
        f"steering changed the latents: {steer['steering_changed_latents']}",
        "",
        f"in-window: one denoising step with CFG inside the steering window, "
        f"{len(in_window['vanilla'].seconds)} interleaved rounds",
        table([("vanilla CFG", in_window["vanilla"]), ("CFG + STAS", in_window["stas"]),
               ("CFG + one extra forward pass (STG/PAG-style)", in_window["extra_pass"])],
              baseline=in_window["vanilla"], cpu_time=cpu_time),
        "",
        f"whole run: {steer['of_steps']} steps with the default window, "
        f"{len(whole_run['vanilla'].seconds)} interleaved rounds",
        table([("vanilla CFG", whole_run["vanilla"]), ("CFG + STAS", whole_run["stas"])],
              baseline=whole_run["vanilla"], cpu_time=cpu_time),
        "",
        f"hook vs block: the steering hook alone vs the forward of the block it follows (last block, first call "
        f"of a step{COMPILED_CASES[compiled['mode']]}), "
        f"{len(hook_vs_block['block'].seconds)} interleaved rounds",
        table([("block forward", hook_vs_block["block"]), ("steering hook", hook_vs_block["hook"])],
              baseline=hook_vs_block["block"], cpu_time=cpu_time),
        "",
        f"in_window_ratio={result['in_window_ratio']:.4f} (target <= 1.01 on CPU, <= 1.005 on GPU)  "
        f"whole_run_ratio={ratios['whole_run']['median']:.4f}  extra_pass_ratio={ratios['extra_pass']['median']:.4f}"
        f"  hook_share_of_block={ratios['hook_share_of_block']['median']:.5f}",
    ]
    return "\n".join(lines)


COMPILED_CASES = {"none": "", "hook": ", the hook compiled", "regional": ", each compiled", "full": ", each compiled"}


def _counts(counts: dict) -> str:
    return f"{counts['graphs']} graphs, {counts['recompiles']} recompiles, {counts['graph_breaks']} graph breaks"


if __name__ == "__main__":
    main()
