"""``alignlab`` command line: a thin layer over the config dataclasses and their train functions.

Flags are the dataclass fields (TRL / ``TrainingArguments`` names), parsed by transformers'
``HfArgumentParser``; ``--config file.yaml`` supplies any of them, and flags on the command line win.
Bad input ends with one line on stderr naming the flag, file or row, and a non-zero exit.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
from pathlib import Path

TOOLS = {
    "score": "score preference pairs with a reward model: mean scores and accuracy",
    "compare": "train several methods side by side on a task and write a report of which won, at what KL and cost",
    "evaluate": "held-out reward, win rate and KL to the base model for any models, on a task or prompts",
    "generate": "sample completions from a base or trained model",
    "prepare-model": "convert the embedded model to its safetensors cache and print its path",
}
"""Commands that are not training methods; the training commands come from :mod:`alignlab.methods`."""


def commands() -> dict[str, str]:
    """Every command with its one-line summary: the registered training methods, then the tools."""
    from alignlab.methods import methods

    return {**{name: m.summary for name, m in methods().items()}, **TOOLS}


class _Exit(Exception):
    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def _optional_bool(value):
    """A ``bool | None`` flag's value: "auto" (or None) is None, decide for me; otherwise transformers'
    ``string_to_bool`` (true/false/yes/no/1/0)."""
    from transformers.hf_argparser import string_to_bool

    if value is None or (isinstance(value, str) and value.lower() == "auto"):
        return None
    try:
        return string_to_bool(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected true, false or auto, got {value!r}") from None


def _parser(prog: str, config_cls):
    from transformers import HfArgumentParser

    from alignlab.train.config import field_docs

    class Parser(HfArgumentParser):
        def error(self, message):  # one line, no usage block
            raise _Exit(f"{self.prog}: error: {message}")

    parser = Parser(config_cls, prog=prog, description=commands().get(prog.split()[-1]))
    docs = field_docs(config_cls)
    optional_bools = {f.name for f in dataclasses.fields(config_cls) if str(f.type).replace(" ", "") == "bool|None"}
    for action in parser._actions:
        name = action.dest
        if name in optional_bools:  # unset ("auto") means "decide for me"; a bare --flag means true, as for bools
            action.nargs, action.const, action.type = "?", True, _optional_bool
        if name in docs and not action.help:
            # argparse %-formats help strings; HfArgumentParser's formatter appends "(default: ...)" itself
            action.help = docs[name].replace("%", "%%")
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file with any of these flags as keys")
    return parser


def _load_yaml_defaults(path: str, config_cls) -> dict:
    import yaml

    if not os.path.isfile(path):
        raise _Exit(f"--config: file not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise _Exit(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from exc
    if not isinstance(data, dict):
        raise _Exit(f"{path}: expected a mapping of flag names to values")
    known = {f.name for f in dataclasses.fields(config_cls)}
    for key in data:
        if key not in known:
            raise _Exit(f"{path}: unknown key {key!r} (not a flag of this command)")
    return data


_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?|-inf(inity)?|-nan", re.IGNORECASE)
_ARGPARSE_NUMBER = re.compile(r"-\d+|-\d*\.\d+")  # what argparse itself reads as a negative number


def _attach_negative_values(argv: list[str]) -> list[str]:
    """``--flag -1e-5`` as ``--flag=-1e-5``: argparse takes a value that starts with ``-`` for a flag unless it
    looks like a plain negative number (``-1``, ``-0.5``), and ``-1e-5`` or ``-inf`` do not (the range check then
    says what is wrong with the value instead of "expected one argument")."""
    out: list[str] = []
    for token in argv:
        previous = out[-1] if out else ""
        if (_NUMBER.fullmatch(token) and not _ARGPARSE_NUMBER.fullmatch(token) and previous.startswith("--")
                and "=" not in previous):
            out[-1] = f"{previous}={token}"
        else:
            out.append(token)
    return out


def parse_config(config_cls, argv: list[str], prog: str):
    """Parse ``argv`` (and an optional ``--config`` YAML file) into ``config_cls``. Every numeric value is checked
    against its range (:func:`alignlab.train.config.check_ranges`) before the config is built.

    Raises:
        _Exit: unknown flag, bad value, unreadable config file (one-line message).
        UserError: a value the config's validation rejects.
    """
    from alignlab.train.config import check_ranges

    argv = _attach_negative_values(argv)
    parser = _parser(prog, config_cls)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**_load_yaml_defaults(known.config, config_cls))
    namespace, remaining = parser.parse_known_args(argv)
    if remaining:
        flag = next((r for r in remaining if r.startswith("-")), remaining[0])
        raise _Exit(f"{prog}: error: unknown flag {flag}" if flag.startswith("-") else f"{prog}: error: unexpected argument {flag!r}")
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(config_cls) if hasattr(namespace, f.name)}
    check_ranges(config_cls, values)
    return config_cls(**values)


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # weight-loading and shard-writing bars; training keeps its own bar
    logging.getLogger("accelerate").setLevel(logging.WARNING)


def print_train_result(method, result) -> None:
    """Where a training run put its outputs (main process only), its last logged ``method.final_metrics`` and
    its final ``method.eval_metric``."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    out = Path(result.output_dir)
    print(f"trained model: {out}")
    print(f"metrics: {result.metrics_path}")
    print(f"config: {out / 'config.yaml'}")
    for plot in result.plots:
        print(f"plot: {plot}")
    for name in method.final_metrics:
        if name in result.train_metrics:
            print(f"last {name}: {result.train_metrics[name]:.4f}")
    if result.eval_metrics and method.eval_metric:
        value = result.eval_metrics.get(method.eval_metric)
        name = method.eval_metric.removeprefix("eval_")
        print(f"eval {name}: {value:.4f}" if value is not None else "")
    print(f"train time: {result.train_seconds:.1f} s over {result.global_step} steps")


def _run_method(command: str, argv: list[str]) -> None:
    from alignlab.methods import get_method
    from alignlab.rollout.rewards import reward_timeout
    from alignlab.train.output_dir import preflight

    method = get_method(command)
    config = parse_config(method.config, argv, f"alignlab {command}")
    preflight(config, resume=not method.checkpoints_in_runs)  # the output folder, before any model is loaded
    with reward_timeout(config.reward_timeout):  # reward functions called outside the training loop too
        result = method.train(config)
    if method.print_result is not None:
        method.print_result(config, result)
    else:
        print_train_result(method, result)


def _run_score(argv: list[str]) -> None:
    from alignlab.algorithms.reward import ScoreConfig, score_dataset

    result = score_dataset(parse_config(ScoreConfig, argv, "alignlab score"))
    print(f"pairs: {result.pairs}")
    print(f"mean chosen score: {result.mean_chosen:.4f}")
    print(f"mean rejected score: {result.mean_rejected:.4f}")
    print(f"accuracy: {result.accuracy:.4f}")


def _run_evaluate(argv: list[str]) -> None:
    from alignlab.experiments.evaluate import EvaluateConfig, evaluate, format_table

    config = parse_config(EvaluateConfig, argv, "alignlab evaluate")
    print(format_table(evaluate(config)))
    if config.output_file:
        print(f"results: {config.output_file}")


def _run_compare(argv: list[str]) -> None:
    from alignlab.experiments.compare import CompareConfig, compare
    from alignlab.experiments.evaluate import format_table

    config = parse_config(CompareConfig, argv, "alignlab compare")
    results = compare(config)
    print(format_table(results["methods"]))
    out = Path(config.output_dir)
    print(f"results: {out / 'results.json'}")
    print(f"report: {out / 'report.html'}")
    print(f"whole run: {results['wall_seconds']:.0f} s")


def _run_generate(argv: list[str]) -> None:
    from alignlab.generate import GenerateConfig, generate

    config = parse_config(GenerateConfig, argv, "alignlab generate")
    for prompt, completions in zip(config.prompt, generate(config)):
        print(f"### prompt: {prompt}")
        for i, text in enumerate(completions):
            if len(completions) > 1:
                print(f"--- completion {i + 1}")
            print(text)


def _run_prepare_model(argv: list[str]) -> None:
    from alignlab.models import embedded_model_path

    if argv:
        raise _Exit(f"alignlab prepare-model: error: unknown flag {argv[0]}")
    print(embedded_model_path())


def _usage() -> str:
    lines = ["usage: alignlab COMMAND [--flags] (alignlab COMMAND --help for the flags)", "", "commands:"]
    lines += [f"  {name:<14} {text}" for name, text in commands().items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``alignlab`` command. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    runners = {
        "score": _run_score,
        "compare": _run_compare,
        "evaluate": _run_evaluate,
        "generate": _run_generate,
        "prepare-model": _run_prepare_model,
    }
    from alignlab.ops import cpu_kernels

    cpu_kernels.prepare_process(rest)  # before torch's first allocation, which the imports below make
    if command not in runners and command not in commands():
        print(f"alignlab: error: unknown command {command!r}\n{_usage()}", file=sys.stderr)
        return 2
    _setup_logging()
    from alignlab.errors import UserError, record_error

    succeeded = False
    try:
        if command in runners:
            runners[command](rest)
        else:
            _run_method(command, rest)
        succeeded = True
    except _Exit as exc:
        record_error(str(exc))
        print(str(exc), file=sys.stderr)
        return exc.code
    except UserError as exc:
        record_error(f"alignlab {command}: error: {exc}")
        print(f"alignlab {command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        record_error(f"alignlab {command}: interrupted")
        print(f"alignlab {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or a failure below us: keep the traceback, record its last line
        record_error(f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}")
        raise
    finally:
        _shutdown(succeeded)
    return 0


def _shutdown(succeeded: bool) -> None:
    """A multi-process run's processes leave together (see :func:`alignlab.train.distributed.shutdown`)."""
    if "torch" in sys.modules:
        from alignlab.train.distributed import shutdown

        shutdown(succeeded)


if __name__ == "__main__":
    sys.exit(main())
