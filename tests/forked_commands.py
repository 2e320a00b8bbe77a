"""Run many short fairseq commands with one import: `python tests/forked_commands.py PLAN.json`.

This process imports fairseq and the plugin once (about 3 s of each command's start-up),
then forks one child per command. The child runs the console script's own entry point
(`fairseq-train` is fairseq_cli.train:cli_main) with that command's argv, stdout and stderr
going to the command's log file. Each command is still its own process: nothing it sets
(seeds, logging, globals) reaches the next one. Forking is safe here: only imports have run,
so no thread pool exists yet.

PLAN.json: {"commands": {key: [console script, args...]}, "logs": {key: path}, "cwd": dir}
-> prints one JSON line {key: exit status}.
"""
import importlib
import json
import os
import sys
import traceback

ENTRY_POINTS = {
    "fairseq-train": "fairseq_cli.train:cli_main",
    "fairseq-eval-lm": "fairseq_cli.eval_lm:cli_main",
    "fairseq-preprocess": "fairseq_cli.preprocess:cli_main",
}


def entry_point(script: str):
    module, function = ENTRY_POINTS[script].split(":")
    return getattr(importlib.import_module(module), function)


def run_child(argv, log_path) -> int:
    """In the forked child: argv[0]'s entry point with stdout and stderr in log_path -> exit status."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    sys.argv = list(argv)
    try:
        entry_point(argv[0])()
        status = 0
    except SystemExit as e:  # how the commands end: argparse (2), exit_with (a message: 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: B036 - a traceback, as the console script would print it
        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return status


def main(plan_path: str) -> None:
    plan = json.loads(open(plan_path).read())
    os.chdir(plan["cwd"])
    for script in {argv[0] for argv in plan["commands"].values()}:
        entry_point(script)  # import every entry point's module before the first fork
    import fairseq_smlp  # noqa: F401  (--user-dir finds it already imported)

    statuses = {}
    for key, argv in plan["commands"].items():
        pid = os.fork()
        if pid == 0:
            os._exit(run_child(argv, plan["logs"][key]))
        statuses[key] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    print(json.dumps(statuses))


if __name__ == "__main__":
    main(sys.argv[1])
