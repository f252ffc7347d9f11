"""Runs the selected benchmark parts on a CUDA device, model by model, saving after each step."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mixkv.bench.compress import COMPRESS_POLICIES, bench_compress
from mixkv.bench.e2e import accepts_token_types, free_memory, is_oom, run_generate
from mixkv.bench.memory import analytic_layer_bytes, breakdown_row, measure_layer_working_set
from mixkv.bench.methods import Method
from mixkv.bench.models import ModelSpec, attention_dims, build_model, load_config, weight_bytes
from mixkv.bench.progress import Progress
from mixkv.bench.prompts import build_inputs
from mixkv.bench.summary import median_rows, mix_overhead, prefill_cost_row
from mixkv.bench.throughput import largest_batch, search_row

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from mixkv.bench.main import Settings

Results = dict[str, list[dict[str, Any]]]
GiB = 2**30


def _count_steps(settings: Settings) -> int:
    per_model = 0
    if "compress" in settings.parts:
        per_model += len(COMPRESS_POLICIES)
    if "e2e" in settings.parts:
        per_model += len(settings.lengths) * len(settings.methods) * settings.repeats
    if "mixcost" in settings.parts:
        per_model += len(settings.lengths) * settings.mix_cost_rounds
    if "memory" in settings.parts:
        per_model += 1
    if "throughput" in settings.parts:
        per_model += len(settings.throughput_methods)
    return per_model * len(settings.models)


def _fmt_gib(value: int | None) -> str:
    return f"{value / GiB:6.2f} GiB" if isinstance(value, int) else "   n/a   "


def _error(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


class Runner:
    """Holds the settings, the device, the results and the progress bar for one invocation."""

    def __init__(
        self,
        settings: Settings,
        device: torch.device,
        save: Callable[[Results], None],
        configs: dict[str, PretrainedConfig] | None = None,
    ) -> None:
        self.s = settings
        self.configs = dict(configs or {})
        self.device = device
        self.save = save
        self.results: Results = {"e2e": [], "mix_cost": [], "compress": [], "throughput": [], "memory": []}
        self.progress = Progress(_count_steps(settings), enabled=settings.progress)

    def run(self) -> Results:
        torch.manual_seed(self.s.seed)
        try:
            for spec in self.s.models:
                self.run_model(spec)
        finally:
            self.progress.close()
        if self.results["e2e"]:
            self.results["e2e_median"] = median_rows(self.results["e2e"])
            self.results["mix_overhead"] = mix_overhead(self.results["e2e"])
        return self.results

    def run_model(self, spec: ModelSpec) -> None:
        config = self.configs.get(spec.name) or load_config(spec)
        dims = attention_dims(config)
        if "compress" in self.s.parts:
            self.progress.describe(f"{spec.name} compress")
            for row in bench_compress(
                spec.name,
                dims,
                length=self.s.compress_length,
                budget=self.s.budget,
                device=self.device,
                reps=self.s.compress_reps,
                loop_reps=self.s.loop_reps,
                seed=self.s.seed,
            ):
                self.results["compress"].append(row)
                tag = f"{row['policy']}{'+mixkv' if row['mix'] else ''}"
                if "error" in row:
                    self.progress.write(f"[compress] {spec.name} {tag}: loop {row['loop_ms']:.2f} ms; {row['error']}")
                else:
                    self.progress.write(
                        f"[compress] {spec.name} {tag:>13} N={row['length']}: mixkv {row['mixkv_ms']:.3f} ms "
                        f"loop {row['loop_ms']:.2f} ms  x{row['speedup_vs_loop']:.1f}"
                    )
                self.progress.step()
            self.save(self.results)
        if not {"e2e", "mixcost", "memory", "throughput"} & set(self.s.parts):
            return
        self.progress.describe(f"{spec.name} build")
        free_memory(self.device)
        model = build_model(config, self.device)
        try:
            self._warmup(model, config, dims)
            if "e2e" in self.s.parts:
                for length in self.s.lengths:
                    self.run_length(spec, model, config, dims, length)
            if "mixcost" in self.s.parts:
                for length in self.s.lengths:
                    self.run_mix_cost(spec, model, config, dims, length)
            if "memory" in self.s.parts:
                self.run_memory(spec, model, config, dims)
            if "throughput" in self.s.parts:
                for method in self.s.throughput_methods:
                    self.run_throughput(spec, model, config, dims, method)
        finally:
            del model
            free_memory(self.device)

    def _inputs(self, config: PretrainedConfig, model: nn.Module, length: int, batch: int = 1) -> tuple[Any, Any]:
        return build_inputs(
            config,
            length,
            batch=batch,
            device=self.device,
            seed=self.s.seed,
            token_types=accepts_token_types(model),
        )

    def _generate(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], method: Method, dims: dict[str, int], new: int
    ) -> dict[str, Any]:
        return run_generate(
            model,
            inputs,
            method,
            budget=self.s.budget,
            new_tokens=new,
            device=self.device,
            layers=dims["layers"],
            kv_heads=dims["kv_heads"],
        ).as_dict()

    def _warmup(self, model: nn.Module, config: PretrainedConfig, dims: dict[str, int]) -> None:
        self.progress.describe("warm-up")
        inputs, _ = self._inputs(config, model, min([*self.s.lengths, 4096]))  # room for any model's smallest image
        methods = [Method(None), *[m for m in self.s.methods if m.policy is not None][:1]]
        for method in methods:
            try:
                self._generate(model, inputs, method, dims, 4)
            except Exception as error:  # reported by the timed runs
                self.progress.write(f"[warm-up] {method.name}: {_error(error)}")
        del inputs
        free_memory(self.device)

    def run_length(
        self, spec: ModelSpec, model: nn.Module, config: PretrainedConfig, dims: dict[str, int], length: int
    ) -> None:
        inputs, info = self._inputs(config, model, length)
        if self.s.warm_full and any(m.policy is None for m in self.s.methods):
            # The first full-cache run at a new prompt length decodes up to 3x slower than the next
            # ones: SDPA's cuDNN backend builds a plan for every new key length, i.e. at every decode
            # step of a growing cache (benchmarks/probe_first_run.py; the compressed runs use mixkv's
            # attention). One untimed run of the same length and token count first, so that every
            # method is timed in its steady state.
            self.progress.describe(f"{spec.name} {length} full (warm-up)")
            try:
                self._generate(model, inputs, Method(None), dims, self.s.new_tokens)
            except Exception as error:  # reported by the timed run
                self.progress.write(f"[warm-up] {spec.name} N={length} full: {_error(error)}")
            free_memory(self.device)
        for repeat in range(self.s.repeats):  # interleaved: every method once per round
            for method in self.s.methods:
                self._run_one(spec, inputs, info, dims, length, method, repeat, model)
        del inputs
        free_memory(self.device)

    def _run_one(
        self,
        spec: ModelSpec,
        inputs: dict[str, torch.Tensor],
        info: Any,
        dims: dict[str, int],
        length: int,
        method: Method,
        repeat: int,
        model: nn.Module,
    ) -> None:
        tag = f" #{repeat + 1}" if self.s.repeats > 1 else ""
        self.progress.describe(f"{spec.name} {length} {method.name}{tag}")
        row: dict[str, Any] = {
            "model": spec.name,
            "length": length,
            "image_tokens": info.image_tokens,
            "image": info.image,
            "budget": self.s.budget if method.policy else None,
            "method": method.name,
            "policy": method.policy,
            "mix": method.mix,
            "batch": 1,
            "repeat": repeat,
        }
        try:
            row |= self._generate(model, inputs, method, dims, self.s.new_tokens)
            self.progress.write(
                f"[e2e] {spec.name} N={length} {method.name:>16}{tag}: prefill {row['prefill_s']:6.2f} s "
                f"total {row['total_s']:7.2f} s decode {row['decode_ms_per_token'] or 0:6.1f} ms/tok "
                f"peak {_fmt_gib(row['peak_bytes'])} cache {_fmt_gib(row['cache_bytes'])}"
            )
        except Exception as error:
            row["error"] = _error(error)
            row["oom"] = is_oom(error)
            self.progress.write(f"[e2e] {spec.name} N={length} {method.name}{tag}: {row['error']}")
        free_memory(self.device)
        self.results["e2e"].append(row)
        self.progress.step()
        self.save(self.results)

    def run_mix_cost(
        self, spec: ModelSpec, model: nn.Module, config: PretrainedConfig, dims: dict[str, int], length: int
    ) -> None:
        """Prefill-only runs (one new token), interleaved base / +MixKV, for every policy with both selected."""
        policies = [m.policy for m in self.s.methods if m.policy and m.mix]
        policies = [p for p in policies if any(m.policy == p and not m.mix for m in self.s.methods)]
        if not policies:
            for _ in range(self.s.mix_cost_rounds):
                self.progress.step()
            return
        inputs, _ = self._inputs(config, model, length)
        samples: dict[tuple[str, bool], list[float]] = {}
        for rnd in range(self.s.mix_cost_rounds):
            self.progress.describe(f"{spec.name} {length} mixkv cost #{rnd + 1}")
            for policy in policies:
                for mix in (False, True):
                    try:
                        run = self._generate(model, inputs, Method(policy, mix), dims, 1)
                        samples.setdefault((policy, mix), []).append(run["prefill_s"])
                    except Exception as error:
                        self.progress.write(f"[mixcost] {spec.name} N={length} {policy}: {_error(error)}")
            self.progress.step()
        del inputs
        free_memory(self.device)
        medians = median_rows(self.results["e2e"])
        totals = {r["method"]: r["total_s"] for r in medians if r["model"] == spec.name and r["length"] == length}
        for policy in policies:
            base, mixed = samples.get((policy, False), []), samples.get((policy, True), [])
            total = totals.get(policy)
            row = prefill_cost_row(spec.name, length, policy, base, mixed, base_total_s=total)
            self.results["mix_cost"].append(row)
            if "error" not in row:
                share = f", {row['total_share'] * 100:.2f}% of total" if row.get("total_share") is not None else ""
                self.progress.write(
                    f"[mixcost] {spec.name} N={length} {policy:>9}: prefill {row['base_prefill_s'] * 1e3:7.1f} -> "
                    f"{row['mix_prefill_s'] * 1e3:7.1f} ms (delta {row['prefill_delta_s'] * 1e3:+.1f} ms{share})"
                )
        self.save(self.results)

    def run_memory(self, spec: ModelSpec, model: nn.Module, config: PretrainedConfig, dims: dict[str, int]) -> None:
        self.progress.describe(f"{spec.name} memory")
        length = max(self.s.lengths)
        compressed = [m for m in self.s.methods if m.policy is not None]
        probe = next((m for m in compressed if m.policy == "adakv" and m.mix), compressed[0] if compressed else None)
        weights = weight_bytes(model)
        analytic = analytic_layer_bytes(dims, length)
        base: dict[str, Any] = {"model": spec.name, "length": length, "weights_bytes": weights}
        try:
            if self.device.type != "cuda":
                raise ValueError("memory: the working-set measurement needs a CUDA device")
            if probe is None:
                raise ValueError("memory: no compressed method selected")
            inputs, _ = self._inputs(config, model, length)
            measured = measure_layer_working_set(
                model, inputs, probe, budget=self.s.budget, dims=dims, device=self.device
            )
            del inputs
        except Exception as error:
            row = base | {"error": _error(error), "layer_working_set_analytic_bytes": analytic}
            self.results["memory"].append(row)
            self.progress.write(f"[memory] {spec.name}: {row['error']}")
            self.progress.step()
            self.save(self.results)
            return
        runs = [r for r in median_rows(self.results["e2e"]) if r["model"] == spec.name and r["length"] == length]
        if not runs:
            runs = [{"model": spec.name, "length": length, "method": "(prefill only)"}]
        for run in runs:
            row = breakdown_row(
                run,
                weights=weights,
                layer_working_set=measured["layer_working_set_bytes"],
                allocated_at_layer_start=measured["allocated_at_layer_start"],
                analytic_layer=analytic,
                layer_inputs=measured["layer_inputs_bytes"],
            )
            row["probe_method"] = probe.name
            self.results["memory"].append(row)
            self.progress.write(
                f"[memory] {spec.name} N={length} {row['method']:>16}: weights {_fmt_gib(weights)} + layer "
                f"{_fmt_gib(row['layer_working_set_bytes'])} + cache {_fmt_gib(row['cache_bytes'])} = "
                f"{_fmt_gib(row['modelled_peak_bytes'])} vs peak {_fmt_gib(row['measured_peak_bytes'])}"
            )
        self.progress.step()
        self.save(self.results)

    def run_throughput(
        self, spec: ModelSpec, model: nn.Module, config: PretrainedConfig, dims: dict[str, int], method: Method
    ) -> None:
        length = self.s.throughput_length
        self.progress.describe(f"{spec.name} throughput {method.name}")
        row: dict[str, Any] = {"model": spec.name, "length": length, "method": method.name}

        def attempt(batch: int, new_tokens: int) -> dict[str, Any] | None:
            self.progress.describe(f"{spec.name} throughput {method.name} b={batch}")
            outcome: dict[str, Any] | None = None
            try:
                inputs, _ = self._inputs(config, model, length, batch)
                outcome = self._generate(model, inputs, method, dims, new_tokens)
                del inputs
            except Exception as error:
                if not is_oom(error):
                    raise
            free_memory(self.device)
            return outcome

        try:
            search = largest_batch(
                lambda b: attempt(b, 2) is not None,
                cap_s=self.s.throughput_cap_s,
                max_batch=self.s.throughput_max_batch,
            )
            row |= search_row(search)
            batch, measured = search.largest, None
            for _ in range(3):
                if batch <= 0:
                    break
                measured = attempt(batch, self.s.throughput_new_tokens)
                if measured is not None:
                    break
                batch = max(batch - max(1, batch // 8), 0)
            if measured is not None:
                row |= {
                    "measured_batch": batch,
                    "decode_tokens_per_s": measured["decode_tokens_per_s"],
                    "decode_ms_per_step": measured["decode_ms_per_token"],
                    "prefill_s": measured["prefill_s"],
                    "total_s": measured["total_s"],
                    "peak_bytes": measured["peak_bytes"],
                    "new_tokens": measured["new_tokens"],
                }
                self.progress.write(
                    f"[throughput] {spec.name} N={length} {method.name:>12}: max batch {search.largest}"
                    f"{' (search capped)' if search.capped else ''}, decode {measured['decode_tokens_per_s']:.1f} "
                    f"tok/s at batch {batch}, peak {_fmt_gib(measured['peak_bytes'])}"
                )
            else:
                row["error"] = "no batch fits" if search.largest == 0 else "the measured run did not fit"
                self.progress.write(f"[throughput] {spec.name} {method.name}: {row['error']}")
        except Exception as error:
            row["error"] = _error(error)
            self.progress.write(f"[throughput] {spec.name} {method.name}: {row['error']}")
        free_memory(self.device)
        self.results["throughput"].append(row)
        self.progress.step()
        self.save(self.results)


def run_all(
    settings: Settings,
    device: torch.device,
    save: Callable[[Results], None],
    configs: dict[str, PretrainedConfig] | None = None,
) -> Results:
    """Runs every selected part; ``save`` is called with the results after each step.

    ``configs`` maps model names to configs used instead of the shipped ones (small test models).
    """
    return Runner(settings, device, save, configs).run()
