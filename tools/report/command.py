"""The command line that trains the runs' config again: ``--preset`` and the flags that give
what the runs changed from it.

A flag's spelling is read from the parser the entry scripts use
(``megatron_nitp.training.arguments.build_parser``, generated from the config's fields), not
restated here: renaming a flag there renames it in the report.
"""

from __future__ import annotations

# Settings the step-by-step commands of the report give explicitly, or that name run folders;
# how a run was resumed (the commands start from scratch); and the data files, read at start
# into the path flags the config also holds (the commands give those prefixes: giving both
# would be refused, and the file may have changed since).
NOT_FLAGS = {"nitp", "seed", "run_dir", "tensorboard_dir", "save", "load", "data_cache_path",
             "exit_on_missing_checkpoint", "override_opt_param_scheduler",
             "use_checkpoint_opt_param_scheduler", "data_args_path", "per_split_data_args_path"}


def flag_spellings(parser):
    """``(on, off)``: for each setting (flat name), the flag that sets a value or turns it on,
    and the flag that turns it off, as ``parser`` declares them (the first declared wins: the
    config's own flags come before Megatron-LM's descriptive ones)."""
    on, off = {}, {}
    for action in parser._actions:
        if not action.option_strings:
            continue
        turns_off = action.nargs == 0 and action.const is False
        (off if turns_off else on).setdefault(action.dest, action.option_strings[0])
    return on, off




def _flag(spellings, name, value) -> list[str]:
    """The command-line words that give setting ``name`` the value ``value``."""
    on, off = spellings
    if isinstance(value, bool):
        flag = on.get(name) if value else off.get(name)
        return [flag] if flag else []
    if isinstance(value, (list, tuple)):
        return [on[name], *map(str, value)]
    return [on[name], str(value)]


def command_flags(config, builtin_corpus) -> list[str]:
    """The flags that give ``config`` over its preset (``--preset`` first), without the arm,
    the seed and the run's folders: each setting that differs from the preset completed with
    the flags found so far (so a value the preset derives, like the positions from the sequence
    length, is not repeated). ``builtin_corpus``: leave out the data and tokenizer paths."""
    from megatron_nitp.config import FLAT, preset_config
    from megatron_nitp.training.arguments import build_parser

    skip = set(NOT_FLAGS) | ({"data_path", "tokenizer_model"} if builtin_corpus else set())
    given = {}
    for _ in range(len(FLAT)):
        base = preset_config(config.preset, config.model_type, **given)
        differ = [n for n in FLAT if n not in skip and n not in given
                  and config.setting(n) != base.setting(n)]
        if not differ:
            break
        given[differ[0]] = config.setting(differ[0])
    spellings = flag_spellings(build_parser(config.model_type))
    flags = ["--preset", config.preset]
    for name, value in given.items():
        flags += _flag(spellings, name, value)
    return flags
