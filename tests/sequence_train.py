"""Several train_ddp.py runs one after another in the same torchrun workers, for tests that need many small
distributed runs (one per model family): the interpreter start-up and the imports of torch and transformers are
paid once per worker instead of once per run.

    torchrun --nproc_per_node=2 tests/sequence_train.py RUNS.json     (RUNS.json: a list of argument lists)

Each run is a new process group against torchrun's one store, as a torchrun restart makes it: the run's index
is its attempt number (TORCHELASTIC_RESTART_COUNT), so its group keys never meet the previous run's. The first
non-zero exit code ends the sequence."""

import json
import os
import sys

import train_ddp  # found through PYTHONPATH, which the tests set (helpers._env)


def main(path: str) -> int:
    with open(path) as fh:
        runs = json.load(fh)
    for i, args in enumerate(runs):
        os.environ["TORCHELASTIC_RESTART_COUNT"] = str(i)
        code = train_ddp.main(args)
        if code:
            print(f"sequence_train: run {i} exited {code}: {' '.join(args)}", file=sys.stderr, flush=True)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
