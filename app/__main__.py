"""Command line: python -m app {train,infer,audit,compare,sweep,bench,make-noisy,perf} ...
(run_train.sh / run_infer.sh wrap the first two)."""
import argparse
import importlib
import logging
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import get_args

# torch, open_clip and accelerate are imported once the settings are checked: a mistake is told in a second
from .config import RULES, SUBMISSION_FILE, changed, from_args, one_line


def _number_or(word: str):
    """An argparse type: a whole number, or `word` (e.g. auto, native)."""
    def parse(value: str):
        if value == word:
            return value
        if not value.isdigit():
            raise argparse.ArgumentTypeError(f"expected a number or {word}, got {value!r}")
        return int(value)
    return parse


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file overriding app/defaults.yaml")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config value, e.g. --set finetune.epochs=4 (repeatable)")
    p.add_argument("--seed", type=int, help="random seed (config: seed)")
    p.add_argument("--precision", choices=get_args(RULES["precision"]), help="mixed precision")
    p.add_argument("--num-workers", type=_number_or("auto"), help="image-decoding processes per training process, "
                                                        "or auto (config: num_workers)")


def _backbone(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", help="local weights file: OpenAI's ViT-B-32.pt or open_clip's hub copy of it "
                                     "(checked by SHA-256; default: open_clip ViT-B-32/openai)")
    p.add_argument("--allow-nonstandard-backbone", action="store_true", default=None,
                   help="accept weights other than OpenAI's ViT-B/32 files (tests and proxy benchmarks only, "
                        "never a submission)")


# name: (module, help). compare serves the user choosing a run; the studies live apart, in app/studies/
TOOLS = {"compare": (".compare", "rank training runs by their estimated test top-1, paired on the validation split "
                                 "they share"),
         "sweep": (".sweep", "train every combination of a settings grid and recommend one, paired on a shared split"),
         "bench": (".studies.bench", "the recipe against baselines, ablations and the clean-label ceiling"),
         "make-noisy": (".studies.make_noisy", "turn a clean class-folder dataset into a noisy one with a truth file"),
         "perf": (".studies.perf", "throughput of the frozen pass, the LoRA step and inference against a naive pipeline")}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="scan, features, noise, warmup, LoRA fine-tune -> OUT_DIR/model.pt")
    t.add_argument("train_dir")
    t.add_argument("out_dir")
    _common(t)
    _backbone(t)
    t.add_argument("--epochs", type=int, help="fine-tuning epochs (config: finetune.epochs)")
    t.add_argument("--image-size", type=_number_or("native"), metavar="N|native",
                   help="fine-tuning and inference input size in px, position embeddings resampled "
                        "(config: input.image_size; default 448)")
    t.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoints")

    i = sub.add_parser("infer", help="OUT_DIR/submission.csv for every test image")
    i.add_argument("test_dir")
    i.add_argument("out_dir")
    _common(i)
    i.add_argument("--model", help="model file (default OUT_DIR/model.pt)")
    i.add_argument("--list", dest="list_file", help="file with one test image name per line")
    i.add_argument("--tau", type=float, help="balanced-prior strength (config: infer.tau, default 1)")
    i.add_argument("--tta", choices=get_args(RULES["infer.tta"]),
                   help="test-time augmentation. flip: average the model's logits over the image and its mirror; "
                        "multiscale: also over the input sizes infer.tta_scales x the trained size (a pass per size). "
                        "config: infer.tta, default none (one forward pass per image)")
    i.add_argument("--balance-test-prior", action="store_true", default=None,
                   help="fit a class bias on the test images' logits so that the predictions come out uniform. "
                        "RULE RISK: fits a parameter on test data (contest rule 3); off by default "
                        "(config: infer.balance_test_prior)")

    a = sub.add_parser("audit", help="scan, features and noise stage only: noise_scores.csv + noise_report.png")
    a.add_argument("train_dir")
    a.add_argument("out_dir")
    _common(a)
    _backbone(a)

    for name, (_, help_) in TOOLS.items():   # tools around the product: `python -m app NAME --help`
        sub.add_parser(name, help=help_)
    return ap


LAUNCHER_ENV = "APP_LAUNCHER"    # set by run_train.sh / run_infer.sh: the script the user ran


def _stop(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _interrupted(args, argv: list[str]) -> str:
    """One line: what an interrupted command leaves behind, and the exact command that continues it."""
    launcher = os.environ.get(LAUNCHER_ENV)
    again = [launcher, *argv[1:]] if launcher else ["python", "-m", "app", *argv]
    if args.command != "train":
        written = "submission.csv" if args.command == "infer" else "noise_scores.csv"
        return f"interrupted: {written} is written at the end, so nothing was. Run again: {shlex.join(again)}"
    from .finetune import latest_checkpoint
    checkpoint = latest_checkpoint(Path(args.out_dir) / "checkpoints")
    if checkpoint is None:
        return (f"interrupted before the first fine-tuning epoch ended: no checkpoint; the frozen features are "
                f"cached. Run again: {shlex.join(again)}")
    resume = again if "--resume" in again else [*again, "--resume"]
    return (f"interrupted: the training state after epoch {int(checkpoint.name.split('-')[-1])} is saved in "
            f"{checkpoint}. Resume with: {shlex.join(resume)}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in TOOLS:       # each tool is its own module with its own options
        tool = importlib.import_module(TOOLS[argv[0]][0], __package__)
        p = argparse.ArgumentParser(prog=f"python -m app {argv[0]}", description=tool.__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        tool.add_arguments(p)
        try:
            tool.run(p.parse_args(argv[1:]))
            return 0
        except KeyboardInterrupt:
            print(f"interrupted: run the same command again to continue ({argv[0]} reuses what it finished)",
                  file=sys.stderr)
            return 130
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    args = parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    logging.getLogger("huggingface_hub").propagate = False     # it prints its warnings itself: once
    try:
        cfg = from_args(args)
    except (FileNotFoundError, ValueError) as e:     # a settings mistake: before any import of torch
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 1
    log = logging.getLogger("app")
    if SUBMISSION_FILE.is_file():
        log.info("settings of the submission: %s (applied before --config and --set)", SUBMISSION_FILE)
    log.info("settings that differ from app/defaults.yaml: %s%s", one_line(changed(cfg)),
             " (every setting: train_report.json, config)" if args.command == "train" else "")
    if args.command == "train" and cfg["finetune"]["tune"] == "none":
        log.warning("finetune.tune=none: no fine-tuning; model.pt will be the warmup's linear head on the "
                    "frozen backbone (the linear-probe baseline)")
    from .backbone import BackboneError
    from .runtime import OtherProcessFailed, close_process_group
    previous = signal.signal(signal.SIGTERM, _stop)        # `docker stop`, kill: like Ctrl-C
    try:
        if args.command == "train":
            from .train import train
            train(args.train_dir, args.out_dir, cfg, resume=args.resume)
        elif args.command == "infer":
            from .infer import infer
            infer(args.test_dir, args.out_dir, cfg, model_path=args.model, list_file=args.list_file)
        else:
            from .train import audit
            audit(args.train_dir, args.out_dir, cfg)
    except KeyboardInterrupt:
        if rank == 0:
            print(_interrupted(args, argv), file=sys.stderr)
        return 130
    except OtherProcessFailed:          # the main process has reported the error
        return 1
    except BackboneError as e:
        if rank == 0:                   # every process meets the same error: said once
            print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, KeyError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        close_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
