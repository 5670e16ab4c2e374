"""A training (or conversion) run that SIGKILLs its own process at a chosen point: the kill tests' subject.

    python tests/killed_run.py block_merge|diffusion_distill [script arguments...]
    python tests/killed_run.py convert SOURCE OUTPUT
    python tests/killed_run.py serve     # the runs above, forked from one process that imported everything once

`BARD_KILL_AT` (environment) says where, as ``EVENT:BLOCK_SIZE:STEP`` (training) or ``EVENT:COUNT`` (conversion):

- ``step:B:S``: in the middle of optimizer step S + 1 of the stage at block size B (after the forward and backward of
  its first micro-batch, before the optimizer step), i.e. between checkpoints;
- ``save-model:B:S``: inside the save of ``checkpoint-S``, right after the model files are written;
- ``save-optimizer:B:S``: inside the same save, right after the optimizer and scheduler files are written;
- ``save-marker:B:S``: inside the same save, with every file written but ``bard_stage.json``;
- ``stage:B:S``: inside the save of the finished stage ``stage-b{B}`` (S ignored), before its rename into place;
- ``copy:N`` (conversion): after N files were copied into the temporary folder.

Without `BARD_KILL_AT` the run is not interrupted. Under `accelerate launch` every process kills itself at the same
point (a rank killed alone takes the others down through the launcher anyway).

`serve` saves the 10 s that importing torch, transformers and TRL costs every run: it imports them once, then reads
one JSON request a line from stdin, ``{"argv": [...], "kill_at": "..." or null, "stdout": PATH, "stderr": PATH,
"timeout": seconds}``, runs each in a forked child process (its own process, which the kill ends like any run, with
its output in the two files) and answers a JSON line on stdout: ``{"returncode": ...}`` (negative: the signal that
ended it; -9 is SIGKILL), or ``{"timed_out": true}`` for a run it ended past its timeout.
"""

import json
import os
import shutil
import signal
import sys
import time
import traceback


def kill() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def patch_trainer(event: str, block_size: int, step: int) -> None:
    from transformers_bard.trainer import block_diffusion_trainer as module

    trainer_class = module.BlockDiffusionTrainer

    def here(trainer) -> bool:
        return trainer.block_sizes[trainer.stage] == block_size and trainer.state.global_step == step

    def wrap(name, after=True):
        original = getattr(trainer_class, name)

        def patched(self, *args, **kwargs):
            if not after and here(self):
                kill()
            result = original(self, *args, **kwargs)
            if after and here(self):
                kill()
            return result

        setattr(trainer_class, name, patched)

    if event == "step":
        wrap("training_step")
    elif event == "save-model":
        original_save_model = trainer_class.save_model

        def save_model(self, output_dir=None, _internal_call=False):
            original_save_model(self, output_dir, _internal_call=_internal_call)
            if _internal_call and here(self):  # inside `_save_checkpoint`, not the stage save
                kill()

        trainer_class.save_model = save_model
    elif event == "save-optimizer":
        wrap("_save_optimizer_and_scheduler")
    elif event == "save-marker":
        original_write = module.write_stage_state

        def write_stage_state(folder, state):
            if not state["complete"] and state["block_size"] == block_size and state["global_step"] == step:
                kill()
            original_write(folder, state)

        module.write_stage_state = write_stage_state
    elif event == "stage":
        original_publish = module.publish_stage

        def publish_stage(staging, final):
            if os.path.basename(final) == f"stage-b{block_size}":
                kill()
            original_publish(staging, final)

        module.publish_stage = publish_stage
    else:
        raise ValueError(f"BARD_KILL_AT: unknown event {event!r}")


def patch_conversion(count: int) -> None:
    from transformers_bard import conversion

    copied = []
    original_copyfile = shutil.copyfile

    def copyfile(source, target, *args, **kwargs):
        result = original_copyfile(source, target, *args, **kwargs)
        copied.append(target)
        if len(copied) == count:
            kill()
        return result

    conversion.shutil.copyfile = copyfile


def main(argv: list[str]) -> None:
    command, arguments = argv[0], argv[1:]
    kill_at = os.environ.get("BARD_KILL_AT")
    if command == "convert":
        if kill_at:
            event, count = kill_at.split(":")
            assert event == "copy", kill_at
            patch_conversion(int(count))
        from transformers_bard import convert_from_autoregressive

        convert_from_autoregressive(arguments[0], arguments[1])
        return
    if kill_at:
        event, block_size, step = kill_at.split(":")
        patch_trainer(event, int(block_size), int(step))
    from transformers_bard.trainer import scripts

    {"block_merge": scripts.run_block_merge, "diffusion_distill": scripts.run_diffusion_distill}[command](arguments)


def serve() -> None:
    # what the runs import, once (the trainers import TRL's, which imports wandb where it is installed: 4 s alone)
    import transformers_bard.conversion  # noqa: F401
    from transformers_bard.trainer import block_merge_trainer, diffusion_distill_trainer, scripts  # noqa: F401

    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the run: the environment and output of a fresh process
            code = 1
            try:
                os.environ.pop("BARD_KILL_AT", None)
                if request["kill_at"] is not None:
                    os.environ["BARD_KILL_AT"] = request["kill_at"]
                for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
                    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.dup2(target, fd)
                    os.close(target)
                main(request["argv"])
                code = 0
            except SystemExit as error:  # argparse and friends: the exit status a fresh process would have
                code = error.code if isinstance(error.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline = time.monotonic() + request["timeout"]
        while not (finished := os.waitpid(pid, os.WNOHANG))[0] and time.monotonic() < deadline:
            time.sleep(0.02)
        if not finished[0]:  # past its timeout: ended here, and said so (not taken for a kill of the test's)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            print(json.dumps({"timed_out": True}), flush=True)
            continue
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(finished[1])}), flush=True)


if __name__ == "__main__":
    serve() if sys.argv[1:] == ["serve"] else main(sys.argv[1:])
