"""The command line: Megatron-LM's flags, generated from the run config's declarations.

Flags keep Megatron-LM's names (``--num-layers``, ``--micro-batch-size``, ``--lr-decay-style``, ...)
so that launch scripts read the same; the NITP ones are ``--nitp-*`` and ``--no-nitp``. Each flag
is a field of a group in ``megatron_nitp/config/schema.py`` (its type, default and, from the
docstring under it, its help): adding a setting is adding a field. The glue is written here by
hand rather than with a library such as ``tyro`` because Megatron's spellings are flat and
irregular (``--num-experts`` for ``num_moe_experts``, ``--no-nitp``, ``--nitp-no-stop-gradient``,
``--no-save``), presets are parser defaults, and the project adds no dependency for ~80 lines.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import os
import typing
from typing import Optional, Sequence

from megatron_nitp.cli import ArgumentParser
from megatron_nitp.config import (FLAT, GROUPS, ConfigError, RunConfig, complete, megatron_lm,
                                  read_data_files, validate)
from megatron_nitp.config.presets import DEFAULT_PRESET, PRESETS, get_preset


@functools.lru_cache(maxsize=None)
def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass, whitespace folded and ``%`` escaped
    (argparse %-formats help strings: "20% of depth" crashed ``--help``)."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for node, doc in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(doc, ast.Expr)
                and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
            docs[node.target.id] = " ".join(doc.value.value.split()).replace("%", "%%")
    return docs


def _value_type(hint):
    """The argparse ``type`` of a field's annotation (``Optional[int]`` -> int; an int-or-str
    setting such as ``--moe-layer-freq`` stays a string)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union:
        return args[0] if len(args) == 1 and args[0] in (int, float, str) else str
    return hint if hint in (int, float, str) else str


def _add_field(group, cls, f: dataclasses.Field, hint) -> None:
    from megatron_nitp.config.schema import field_dest

    dest = field_dest(cls, f)
    meta = f.metadata
    help_text = field_docs(cls).get(f.name, "")
    name = meta.get("name", "--" + dest.replace("_", "-"))
    if hint == Optional[bool]:  # three states: --x (on), --no-x (off), neither (auto)
        group.add_argument(name, dest=dest, action="store_const", const=True,
                           help=help_text)
        group.add_argument(meta["negative"], dest=dest, action="store_const", const=False,
                           help=f"turn off: {help_text}").negated = True
        group.set_defaults(**{dest: f.default})
        return
    if hint is bool:
        if meta.get("negative"):
            # the only flag of its setting: the docstring says what giving it does
            group.add_argument(meta["negative"], dest=dest, action="store_false",
                               help=help_text if not name else
                               f"turn off (default on): {help_text}").negated = True
        if name:
            group.add_argument(name, *meta.get("aliases", ()), dest=dest, action="store_true",
                               help=help_text)
        group.set_defaults(**{dest: f.default})
        return
    kwargs = dict(dest=dest, default=f.default, help=help_text)
    if meta.get("choices"):
        kwargs["choices"] = list(meta["choices"])
    if meta.get("nargs"):
        kwargs["nargs"] = meta["nargs"]
        if meta.get("item_type"):
            kwargs["type"] = meta["item_type"]
    else:
        kwargs["type"] = _value_type(hint)
    group.add_argument(name, *meta.get("aliases", ()), **kwargs)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown, except on a negated flag (``--no-nitp``): its default is the setting's
    (True), which would read as if the flag were given by default."""

    def _get_help_string(self, action):
        if getattr(action, "negated", False):
            return action.help
        return super()._get_help_string(action)


def build_parser(model_type: str = "dense") -> argparse.ArgumentParser:
    """Flags of ``pretrain_gpt_nitp.py`` (``dense``) or ``pretrain_moe_nitp.py`` (``moe``)."""
    kind = "a DeepSeek-V2-style MoE GPT" if model_type == "moe" else "a GPT"
    p = ArgumentParser(
        description=f"Pretrain {kind} with Next Implicit Token Prediction on megatron-core.",
        formatter_class=_HelpFormatter,
    )
    default = "tiny-moe" if model_type == "moe" else DEFAULT_PRESET
    p.add_argument("--preset", default=default, help=f"model preset: {', '.join(PRESETS)}")
    p.add_argument("--list-presets", action="store_true",
                   help="print the presets (parameters, layers, NITP settings) and exit")
    p.add_argument("--json", action="store_true", help="with --list-presets: JSON output")
    p.add_argument("--dry-run", action="store_true",
                   help="parse, build the configuration, check the layout and the memory "
                        "estimate, print the plan and exit (no process group, no model)")
    p.add_argument("--world-size", dest="planned_world_size", type=int, default=None,
                   help="with --dry-run: the number of processes the job will have "
                        "(default: $WORLD_SIZE or TP x PP x CP)")
    for cls, title in GROUPS.values():
        group = p.add_argument_group(title)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            _add_field(group, cls, f, hints[f.name])
    megatron_lm.add_flags(p)
    return p


def given_flags(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> set[str]:
    """The dests the command line sets itself (not a preset or a default): ``argv`` parsed
    again with every default suppressed."""
    import copy

    unset = object()  # not a string: argparse converts string defaults with the flag's type
    bare = copy.deepcopy(parser)
    for action in bare._actions:
        action.default = unset
    bare._defaults = {dest: unset for dest in bare._defaults}
    known, _ = bare.parse_known_args(argv)
    return {dest for dest, value in vars(known).items() if value is not unset}


def describe_sources(config: RunConfig) -> str:
    """The config dump a run prints and keeps: every setting with where it came from."""
    from megatron_nitp.config import FLAT

    width = max(len(name) for name in FLAT)
    lines = [f"  {'preset':<{width}} = {config.preset!r:<24} {config.source('preset')}"]
    for group in GROUPS:
        for name, (g, attr) in FLAT.items():
            if g == group:
                value = getattr(getattr(config, group), attr)
                lines.append(f"  {name:<{width}} = {value!r:<24} {config.source(name)}")
    if config.derived is not None:
        for name, value in dataclasses.asdict(config.derived).items():
            if name != "moe_layer_pattern" or value is not None:
                lines.append(f"  {name:<{width}} = {value!r:<24} derived")
    return "\n".join(lines)


def kept_preset_fields(config: RunConfig) -> list[str]:
    """Without ``--preset``, the default preset's values that apply although the command line
    set other model fields: said plainly at start, since the user may not expect them."""
    sources = dict(config.sources)
    if sources.get("preset", "flag") == "flag":  # chosen, or not from a command line
        return []
    shaped = any(sources.get(n) == "flag" for n in FLAT if FLAT[n][0] in ("model", "moe"))
    if not shaped:
        return []
    return sorted(n for n, where in sources.items()
                  if n in FLAT and where.startswith("preset "))


#: settings given as several values (tuples in the config)
NARGS = tuple(name for name, (group, attr) in FLAT.items()
              if "nargs" in {f.name: f for f in dataclasses.fields(GROUPS[group][0])}[attr].metadata)

MOE_FLAGS = ("num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size",
             "moe_shared_expert_intermediate_size", "moe_layer_freq")


def parse_args(argv: Optional[Sequence[str]] = None, model_type: str = "dense") -> RunConfig:
    """The run config from flags over the preset's defaults, completed and validated.

    ``model_type`` is the entry point's: ``dense`` refuses MoE presets and flags, ``moe``
    requires them. Bad input exits with code 2 and a message naming the fix."""
    parser = build_parser(model_type)
    known, _ = parser.parse_known_args(argv)
    if known.list_presets:
        from megatron_nitp.accounting.preset_table import print_presets

        print_presets(as_json=known.json)
        parser.exit(0)
    try:
        preset = get_preset(known.preset)
    except ValueError as err:
        parser.error(str(err))
    given = {k for k in MOE_FLAGS if getattr(known, k) is not None}
    preset_type = preset.pop("model_type", "dense")
    if model_type == "dense" and (preset_type == "moe" or given):
        what = f"--preset {known.preset}" if preset_type == "moe" else ", ".join(
            "--" + k.replace("_", "-").replace("num-moe-experts", "num-experts") for k in sorted(given))
        parser.exit(2, f"{parser.prog}: error: {what} is for mixture-of-experts models: use "
                       "pretrain_moe_nitp.py (this entry point trains dense GPTs).\n")
    if model_type == "moe" and preset_type != "moe" and known.num_moe_experts is None:
        parser.exit(2, f"{parser.prog}: error: --preset {known.preset} is a dense model: choose "
                       "a MoE preset (--list-presets) or give --num-experts.\n")
    parser.set_defaults(**preset)
    ns = parser.parse_args(argv)
    refusal = megatron_lm.check(ns)
    if refusal:
        parser.exit(2, f"{parser.prog}: error: {refusal}\n")
    values = {dest: getattr(ns, dest) for dest in FLAT}
    for name in NARGS:
        if values[name] is not None:
            values[name] = tuple(values[name])
    given = given_flags(parser, argv)
    sources = tuple(sorted(
        [(dest, "flag" if dest in given else f"preset {ns.preset}" if dest in preset
          else "default") for dest in FLAT]
        + [("preset", "flag" if "preset" in given else "default")]))
    config = RunConfig.from_flat(values, preset=ns.preset, model_type=model_type,
                                 dry_run=ns.dry_run, planned_world_size=ns.planned_world_size,
                                 sources=sources)
    try:
        config = complete(read_data_files(config))
        validate(config)
    except ConfigError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return config


def multi_node_launch(environ=None) -> str | None:
    """Why this process looks like one rank of a job on several nodes (None if it does not):
    torchrun's ``WORLD_SIZE > LOCAL_WORLD_SIZE``, or, for ranks started by srun directly (one
    task per rank, no LOCAL_WORLD_SIZE), ``SLURM_STEP_NUM_NODES > 1``."""
    environ = os.environ if environ is None else environ

    def number(name):
        try:
            return int(environ.get(name, ""))
        except ValueError:
            return None

    world, local = number("WORLD_SIZE"), number("LOCAL_WORLD_SIZE")
    if world is not None and local is not None:
        return f"WORLD_SIZE {world} > LOCAL_WORLD_SIZE {local}" if world > local else None
    nodes = number("SLURM_STEP_NUM_NODES")
    if nodes is not None and nodes > 1 and (world or number("SLURM_NTASKS") or 1) > 1:
        return f"SLURM_STEP_NUM_NODES {nodes}"
    return None


def validate_data_cache(args, environ=None) -> None:
    """A job on several nodes needs ``--data-cache-path`` on a shared file system.

    megatron-core builds the dataset index cache on global rank 0 only; the other ranks then
    read it. The default folder (``$MEGATRON_NITP_CACHE/dataset-index``, inside each node's
    container in the Docker image, or ``~/.cache``) is local to a node, so every rank on the
    other nodes would fail with FileNotFoundError after the first node built its cache."""
    if args.data.data_cache_path or args.dry_run:
        return
    why = multi_node_launch(environ)
    if why:
        raise ValueError(
            f"this job runs on several nodes ({why}) and --data-cache-path is not set: "
            "megatron-core builds the dataset index cache on global rank 0 only, and the "
            "default cache folder ($MEGATRON_NITP_CACHE/dataset-index, e.g. inside each "
            "node's container) is not shared, so the ranks on the other nodes would fail with "
            "FileNotFoundError. Pass --data-cache-path DIR on a file system every node sees "
            "(the examples use $RUN_DIR/data-cache)."
        )


def default_run_dir(args) -> str:
    import time

    kind = "nitp" if args.nitp_config.enabled else "ntp"
    return os.path.join("runs", f"{args.preset}-{kind}-{time.strftime('%Y%m%d-%H%M%S')}")
