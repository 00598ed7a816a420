"""The `keyface` command line (console script and `python -m keyface`)."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import click

from keyface_core.errors import KeyFaceError

EXIT_OK = 0            # every image done (in this run or an earlier one)
EXIT_FAILURES = 1      # at least one image failed or had no face; the others are done; the report says which
EXIT_USAGE = 2         # the command cannot run as given (options, key, model, folders); nothing was processed
EXIT_NOTHING = 3       # no input image matched
EXIT_INTERRUPTED = 130 # Ctrl-C / SIGTERM: finished images are kept, the report is written; rerun to resume

EXIT_CODES_HELP = """\b
Exit codes:
  0   every image is done (now, or skipped because an earlier run did it)
  1   some images failed or had no face; all others are done (see the report)
  2   usage error: bad option, unreadable key, model that cannot load; nothing was processed
  3   nothing to do: no input image matched
  130 interrupted (Ctrl-C or SIGTERM); rerun the same command to resume
"""

log = logging.getLogger("keyface")


class _Group(click.Group):
    def format_epilog(self, ctx, formatter):
        formatter.write_paragraph()
        formatter.write(EXIT_CODES_HELP)
        super().format_epilog(ctx, formatter)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
             epilog="Run `keyface COMMAND --help` for the manual of each command.")
@click.version_option(package_name="keyface", prog_name="keyface", message="%(prog)s %(version)s")
def main():
    """KeyFace: secure, reversible face anonymization for folders and datasets.

    Every face of every photo is replaced by a different, generated face drawn by your diffusion model from
    noise scrambled with your secret key. Whoever holds the key restores the original faces exactly; everything
    outside the faces stays bit-identical. Outputs are PNGs carrying only the pixels and the KeyFace record
    (no EXIF, no ICC, no source file name).

    \b
    Typical use:
      keyface keygen archive.key
      keyface anonymize photos/ --out anonymized/ --key archive.key --model runwayml/stable-diffusion-v1-5
      keyface restore anonymized/ --out restored/ --key archive.key --model runwayml/stable-diffusion-v1-5
      keyface inspect anonymized/0001.png
    """


# ----------------------------------------------------------------------------------------------
# keygen
# ----------------------------------------------------------------------------------------------

@main.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def keygen(path: Path):
    """Write a new 256-bit key file at PATH (`.key` is added when PATH has no suffix), owner-only (mode 600).

    Never overwrites an existing file. Back the key up: without it, nothing anonymized with it can be restored."""
    from keyface_core.keys import write_key_file
    if not path.suffix:
        path = path.with_suffix(".key")
    try:
        written = write_key_file(path)
    except KeyFaceError as err:
        _fail(str(err), EXIT_USAGE)
    click.echo(f"wrote {written} (owner-only). Back it up: without it, images anonymized with it cannot be restored.")


# ----------------------------------------------------------------------------------------------
# shared options
# ----------------------------------------------------------------------------------------------

def _key_option(fn):
    fn = click.option("--key-kind", type=click.Choice(["key", "passphrase"]), default="key", show_default=True,
                      help="`passphrase`: the file/variable holds a passphrase (>= 12 characters, stretched with "
                           "scrypt per image) instead of 64 hex digits.")(fn)
    return click.option("--key", "key_source", required=True, metavar="FILE|env:VAR",
                        help="The secret key: a key file made by `keyface keygen`, or env:VAR to read it from an "
                             "environment variable. Never the key itself: it must not appear in shell history, "
                             "reports or logs.")(fn)


def _run_options(fn):
    options = [
        click.option("--model", "-m", "model", required=True, metavar="MODEL",
                     help="A diffusers folder, a Hugging Face repo id in the local cache, or a .safetensors/.ckpt "
                          "checkpoint. Restore needs exactly the same model (its fingerprint is checked). "
                          "dev:tiny runs a seeded random model (mechanics only)."),
        click.option("--model-config", default=None, metavar="DIR|REPO",
                     help="For a single .safetensors/.ckpt file: a diffusers folder or cached repo id of the same "
                          "architecture holding its configs, tokenizers and scheduler (default: $KEYFACE_MODEL_CONFIG)."),
        click.option("--out", "-o", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
                     help="Output folder (created). Outputs mirror the input tree, always as .png."),
        click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                     help="local: this process. ray: Ray Data actors, each loading the model once "
                          "(needs keyface[ray]); --address names an existing cluster."),
        click.option("--address", default=None, metavar="ADDR",
                     help="Ray cluster address (ray://host:10001 or auto); default: start a local cluster."),
        click.option("--workers", type=click.IntRange(min=1), default=None,
                     help="Ray actors (default: one per GPU, or CPUs - 1); each gets a share of the cluster's CPUs."),
        click.option("--ray-cpus", type=click.IntRange(min=1), default=None,
                     help="CPUs of the local Ray cluster started when no --address is given (default: all)."),
        click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto."),
        click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
                     show_default=True, help="Model weights' dtype (exactness needs the same at restore)."),
        click.option("--threads", type=click.IntRange(min=0), default=0,
                     help="torch CPU threads per process (0: torch's default)."),
        click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="Report file, .json or .csv (default: OUT.keyface-report.json beside the output folder, "
                          "never inside it: it names the source files)."),
        click.option("--flat-names", is_flag=True,
                     help="Number the outputs 000001.png, 000002.png... instead of mirroring the input names, so "
                          "no output name can identify a person; the report maps numbers to sources."),
        click.option("--allow-no-face", is_flag=True,
                     help="Photos without a detected face do not count as failures (exit 0). They are still never "
                          "copied to the output."),
        click.option("--progress/--no-progress", default=None,
                     help="Progress bar with ETA on stderr (default: when stderr is a terminal)."),
        click.option("--verbose", "-v", is_flag=True, help="Debug logging (never key material)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return _key_option(fn)


# ----------------------------------------------------------------------------------------------
# anonymize
# ----------------------------------------------------------------------------------------------

@main.command(epilog=EXIT_CODES_HELP)
@click.argument("inputs", nargs=-1, required=True, metavar="INPUTS...")
@click.option("--steps", type=click.IntRange(min=1, max=1000), default=30, show_default=True,
              help="Inversion steps; restore replays them (this many model calls per restore).")
@click.option("--scheduler", type=click.Choice(["normal", "karras", "exponential", "simple"]), default="karras",
              show_default=True, help="Noise schedule, from the model's scheduler config; stored in the file.")
@click.option("--method", type=click.Choice(["exact", "exact_single", "plain"]), default="exact", show_default=True,
              help="Inversion: exact (two-state leapfrog, float64, restores bit for bit), exact_single, plain.")
@click.option("--sampler", type=click.Choice(["dpmpp_2m", "euler", "heun"]), default="dpmpp_2m", show_default=True,
              help="What draws the new face from the keyed noise (restore never re-runs it).")
@click.option("--render-steps", type=click.IntRange(min=1, max=1000), default=None,
              help="Steps for drawing the new face (default: --steps).")
@click.option("--prompt", default="", help="Prompt the model sees while inverting (restore must pass the same).")
@click.option("--negative", default="", help="Negative prompt (used when cfg is not 1).")
@click.option("--cfg", type=float, default=1.0, show_default=True,
              help="Guidance while inverting; 1 inverts most faithfully. Stored; restore reuses it.")
@click.option("--render-prompt", default=None, help="Prompt for drawing the new face (default: --prompt).")
@click.option("--render-cfg", type=float, default=None, help="Guidance for drawing the new face (default: --cfg).")
@click.option("--scramble", type=click.Choice(["pairswap", "signflip"]), default="pairswap", show_default=True,
              help="pairswap: keyed pair swaps with keyed signs; signflip: the paper's keyed sign flip.")
@click.option("--crop-size", type=click.IntRange(min=8), default=512, show_default=True,
              help="Face crops are resized to this square (the model's working resolution; multiple of 8).")
@click.option("--max-faces", type=click.IntRange(min=1), default=16, show_default=True,
              help="At most this many faces per photo (the most confident).")
@click.option("--min-face-px", type=click.IntRange(min=0), default=0, show_default=True,
              help="Ignore faces smaller than this (pixels).")
@click.option("--detector", type=click.Choice(["hog", "auto", "cnn"]), default="hog", show_default=True,
              help="hog: dlib's HOG detector (fast, frontal faces). auto: HOG, then HOG on the photo turned 90/270 "
                   "degrees, then dlib's CNN when nothing is found (slow on CPU for photos without a face). cnn: "
                   "dlib's CNN only (more poses; seconds per photo on CPU).")
@click.option("--coverage", type=click.Choice(["face", "face+ears+neck", "head"]), default="face", show_default=True,
              help="How much of each head is replaced: the face oval; plus ears and neck; or the whole head with "
                   "hair. More coverage hides more of the person and regenerates more pixels.")
@click.option("--faces", "which_faces", default="all", show_default=True,
              help="Which faces to anonymize: all, 'largest N', or face numbers counted left to right from 0 "
                   "('0,2', '1-3').")
@click.option("--threshold", type=float, default=0.0, show_default=True,
              help="Detector score a face must reach (0 = dlib's default; lower finds more, higher only sure faces).")
@click.option("--max-megapixels", type=click.FloatRange(min=0.001), default=64.0, show_default=True,
              help="Refuse (report) photos larger than this.")
@click.option("--nonce", type=click.Choice(["random", "derived"]), default="random", show_default=True,
              help="random: a fresh public nonce per face (default). derived: from the key and the photo, so the "
                   "same photo and key always give the same file (reproducible runs; reveals only whether two "
                   "inputs were identical).")
@click.option("--store-landmarks", is_flag=True, default=False,
              help="Also store each face's 68 dlib landmarks (numbers, in the clear: the original face's expression, "
                   "pose and proportions; no texture or identity descriptor), for tools that redraw a ControlNet "
                   "hint from them. Off by default: the command line draws no hint, so restore never needs them.")
@_run_options
def anonymize(inputs, steps, scheduler, method, sampler, render_steps, prompt, negative, cfg, render_prompt,
              render_cfg, scramble, crop_size, max_faces, min_face_px, detector, coverage, which_faces, threshold,
              max_megapixels, nonce, store_landmarks, **run):
    """Anonymize every face in INPUTS (files, folders walked recursively, glob patterns such as 'shots/**/*.jpg').

    Each photo becomes OUT/<its path relative to the folder it was found in>.png (or a number with --flat-names):
    the anonymized pixels plus the KeyFace record that restore needs. Output names mirror the input names, so if
    those name people, use --flat-names. Inputs are never overwritten, metadata (EXIF, GPS, ICC, comments) is
    dropped, photos are turned upright by their EXIF orientation.

    Resumable: an output that exists is complete (atomic writes) and is skipped, so rerunning the same command
    after a crash or Ctrl-C does only what is left. A photo that fails (unreadable, not an image, no face, too
    large) never stops the batch: it goes into the report with the reason, and the exit code says so.
    """
    from .pipeline import Settings
    settings = Settings(steps=steps, scheduler=scheduler, method=method, cfg=cfg, prompt=prompt, negative=negative,
                        sampler=sampler, render_steps=render_steps, render_cfg=render_cfg,
                        render_prompt=render_prompt, scramble=scramble, crop_size=crop_size, max_faces=max_faces,
                        min_face_px=min_face_px, detector=detector, coverage=coverage, faces=which_faces,
                        threshold=threshold, max_megapixels=max_megapixels, nonce=nonce,
                        store_landmarks=store_landmarks)
    sys.exit(_run_batch("anonymize", inputs, settings, **run))


# ----------------------------------------------------------------------------------------------
# restore
# ----------------------------------------------------------------------------------------------

@main.command(epilog=EXIT_CODES_HELP)
@click.argument("inputs", nargs=-1, required=True, metavar="INPUTS...")
@click.option("--prompt", default="", help="The --prompt of the anonymizing run (checked against the file).")
@click.option("--negative", default="", help="The --negative of the anonymizing run.")
@click.option("--allow-wrong-key", is_flag=True,
              help="Restore even when the key's check value does not match (shows what a wrong key gives).")
@_run_options
def restore(inputs, prompt, negative, allow_wrong_key, **run):
    """Restore the original faces of anonymized PNGs in INPUTS (files, folders, globs) with the key.

    Each restored photo is written to OUT mirroring the input tree, as a plain PNG (no KeyFace record). Every face
    is checked against the keyed digest stored at anonymization: the report says `verified` (bit for bit) per
    photo, or by how much it differs (another machine's numerics) — never silently. A wrong key, a different
    model or prompt, a file without its record: reported per photo, the batch goes on.
    """
    from .pipeline import RestoreSettings
    settings = RestoreSettings(prompt=prompt, negative=negative, allow_wrong_key=allow_wrong_key)
    sys.exit(_run_batch("restore", inputs, settings, **run))


# ----------------------------------------------------------------------------------------------
# inspect
# ----------------------------------------------------------------------------------------------

@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(file: Path, as_json: bool):
    """Show what an anonymized PNG carries: size, settings, model and conditioning fingerprints, faces.

    Everything shown is public (the file holds no key, no passphrase, no source name); encrypted parts are shown
    by size only."""
    from . import store
    try:
        _, record = store.read(file)
    except KeyFaceError as err:
        _fail(str(err), EXIT_FAILURES)
    if record is None:
        _fail(f"{file.name} carries no KeyFace record (not written by KeyFace, or converted/edited since).",
              EXIT_FAILURES)
    info = describe(record)
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    inv, render = info["inversion"], info["render"]
    click.echo(f"{file.name}: KeyFace format v{info['version']}, {info['image_size'][0]}x{info['image_size'][1]}, "
               f"{len(info['faces'])} face(s)")
    click.echo(f"  inversion: {inv['method']}, {inv['steps']} steps, {inv['scheduler']}, cfg {inv['cfg']}, "
               f"scramble {info['scramble']}")
    click.echo(f"  model fingerprint: {inv['model_id']}   conditioning: {inv['cond_id']}")
    if render:
        click.echo(f"  drawn with: {render['sampler']}, {render['steps']} steps, {render['scheduler']}, "
                   f"cfg {render['cfg']}")
    click.echo(f"  key: {'passphrase (scrypt ' + str(info['kdf']) + ')' if info['kdf'] else 'key file'}; "
               "a 64-bit key check per face lets restore refuse a wrong key")
    for face in info["faces"]:
        click.echo(f"  face {face['index']}: box x={face['box'][0]} y={face['box'][1]} size={face['box'][2]}, "
                   f"latent {face['latent_shape']}, sealed residual {face['sealed_residual_bytes']} B, "
                   f"sealed reference {face['sealed_reference_bytes']} B"
                   + (", 68 landmarks (public: the original face's geometry)" if face["landmarks"] else ""))


def describe(record) -> dict:
    """The public content of a record as plain data (what `inspect` prints)."""
    keyed, inv = record.keyed, record.inversion
    faces = []
    for i, entry in enumerate(record.faces):
        sealed = keyed.lock.sealed_residuals[i]
        reference = keyed.lock.references[i]
        faces.append({"index": int(keyed.faces.face_indices[i]), "box": list(entry.box),
                      "latent_shape": list(keyed.x.shape[1:]),
                      "sealed_residual_bytes": 0 if sealed is None else int(getattr(sealed, "nbytes", len(sealed))),
                      "sealed_reference_bytes": 0 if reference is None else len(reference),
                      "landmarks": getattr(entry, "landmarks", None) is not None})
    render = record.render
    return {"format": "keyface", "version": 2, "image_size": list(record.image_size),
            "pixels_sha256": record.pixels_sha256,
            "inversion": {"method": inv.method, "steps": inv.steps, "scheduler": inv.scheduler, "cfg": inv.cfg,
                          "model_id": inv.model_id, "cond_id": inv.cond_id},
            "render": None if render is None else {"sampler": render.sampler, "steps": render.steps,
                                                   "scheduler": render.scheduler, "cfg": render.cfg},
            "scramble": keyed.lock.scramble, "kdf": keyed.lock.kdf, "crop_size": record.crop_size,
            "latent": {"channels": record.latent_format.channels, "scale_factor": record.latent_format.scale_factor,
                       "shift_factor": record.latent_format.shift_factor},
            "faces": faces}


# ----------------------------------------------------------------------------------------------
# paper
# ----------------------------------------------------------------------------------------------

@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def paper(ctx):
    """The paper's setting (Labarbarie et al.): unconditional face LDM at 256², DDIM 50 steps, sign flip in the
    face mask, on a folder of faces; prints the paper's columns next to the published numbers.

    Arguments are those of benchmarks/paper_setting.py (`keyface paper --help-setting` lists them). With the
    seeded dev models the numbers are mechanics only, and the table says so."""
    try:
        from benchmarks import paper_setting
    except ImportError:
        try:
            from keyface_core import paper_setting   # if the function moves into the core
        except ImportError:
            _fail("the paper setting needs the diffusers backend and benchmarks/paper_setting.py, which this version "
                  "of KeyFace does not include yet.", EXIT_USAGE)
    args = list(ctx.args)
    if "--help-setting" in args:
        args = ["--help"]
    code = paper_setting.main(args)
    sys.exit(int(code or 0))


# ----------------------------------------------------------------------------------------------
# The batch runner shared by anonymize and restore
# ----------------------------------------------------------------------------------------------

def _fail(message: str, code: int):
    click.echo(f"keyface: {message}", err=True)
    sys.exit(code)


def _key_spec(source: str, kind: str):
    from .engines import KeySpec
    if source.startswith("env:"):
        return KeySpec(source, kind)
    path = Path(source)
    if not path.is_file():
        # Never echo a value that is not a path: it may be a key pasted by mistake.
        shown = f" '{source}'" if ("/" in source or os.sep in source or source.endswith(".key")) else ""
        raise KeyFaceError(f"--key{shown} is not an existing key file. Pass a file made by `keyface keygen` or "
                           "env:VAR; never the key itself (it would land in shell history).")
    return KeySpec(str(path.resolve()), kind)


class _Terminated(Exception):
    pass


def _on_sigterm(signum, frame):
    raise _Terminated()


def _run_batch(operation: str, inputs, settings, *, key_source, key_kind, model, model_config, out, engine, address, workers, ray_cpus,
               device, dtype, threads, report_path, flat_names, allow_no_face, progress, verbose) -> int:
    from . import batch, engines, store

    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="keyface: %(message)s")
    start = time.perf_counter()
    try:
        if operation == "anonymize":
            settings.check()
        key_spec = _key_spec(key_source, key_kind)
        key = key_spec.load()
        report_path = report_path or batch.default_report_path(out)
        previous = batch.load_report(report_path)
        tasks = batch.plan(inputs, out, flat_names=flat_names, previous=previous)
    except KeyFaceError as err:
        click.echo(f"keyface {operation}: {err}", err=True)
        return EXIT_USAGE
    if not tasks:
        click.echo(f"keyface {operation}: nothing to do: no image file found in {' '.join(inputs)}.", err=True)
        return EXIT_NOTHING
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        click.echo(f"keyface {operation}: cannot create the output folder {out}: {err.strerror}.", err=True)
        return EXIT_USAGE
    removed = store.remove_stale(out) + store.remove_stale(report_path.parent, recursive=False)
    if removed:
        log.warning("removed %d unfinished temporary file(s) of an interrupted run", removed)
    job = engines.Job(operation, str(out), settings, model, key_spec, device, dtype, threads, model_config)
    report = batch.Report(report_path, operation, _public_settings(settings, job, engine), tasks, previous)
    todo = [t for t in tasks if not (out / t.rel).exists()]
    show = sys.stderr.isatty() if progress is None else progress
    from tqdm import tqdm
    bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), unit="img", disable=not show, file=sys.stderr,
               dynamic_ncols=True, desc=operation)

    def on_result(task, result):
        if result.status == "skipped":
            old = report.previous_row(task.key)
            if old and old.get("status") == "ok":
                result.faces = old.get("faces")
        report.add(task, result)
        if result.status in ("failed", "no_face"):
            bar.write(f"keyface: {task.key}: {result.reason}", file=sys.stderr)
        if task in todo_set:
            bar.update(1)

    todo_set = set(todo)
    for task in tasks:
        if task not in todo_set:
            on_result(task, engines.run_task(task, job, None, None))   # skipped: no model needed
    interrupted = False
    previous_handler = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if engine == "ray":
            def started(plan, seconds):
                log.info("ray: %d actors, %.2f CPU / %.2f GPU each, started in %.1f s", plan.workers, plan.num_cpus,
                         plan.num_gpus, seconds)
            engines.run_ray(todo, job, on_result, address=address, workers=workers, local_cpus=ray_cpus,
                            on_started=started)
        elif todo:
            try:
                loaded = engines.setup_worker(job)
            except KeyFaceError as err:
                bar.close()
                click.echo(f"keyface {operation}: {err}", err=True)
                return EXIT_USAGE
            engines.run_local(todo, job, on_result, *loaded)
    except (KeyboardInterrupt, _Terminated):
        interrupted = True
    except KeyFaceError as err:
        bar.close()
        report.write()
        click.echo(f"keyface {operation}: {err}", err=True)
        return EXIT_USAGE
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        bar.close()
    report.write(final=True)
    store.cleanup(out)
    counts = report.counts()
    elapsed = time.perf_counter() - start
    done_now = counts.get("ok", 0)
    rate = f", {done_now / elapsed * 60:.1f} img/min" if done_now and elapsed > 0 else ""
    parts = [f"{counts.get('ok', 0)} done", f"{counts.get('skipped', 0)} already done",
             f"{counts.get('no_face', 0)} without a face", f"{counts.get('failed', 0)} failed"]
    if counts.get("pending"):
        parts.append(f"{counts['pending']} not reached")
    if operation == "restore":
        verified = sum(1 for row in report.rows.values() if row.get("verified"))
        parts.append(f"{verified} verified exact")
    click.echo(f"keyface {operation}: {len(tasks)} images: {', '.join(parts)} in {elapsed:.1f} s{rate}; "
               f"report: {report_path}", err=True)
    if interrupted:
        click.echo(f"keyface {operation}: interrupted; rerun the same command to resume.", err=True)
        return EXIT_INTERRUPTED
    bad = counts.get("failed", 0) + (0 if allow_no_face else counts.get("no_face", 0))
    return EXIT_FAILURES if bad else EXIT_OK


def _public_settings(settings, job, engine: str) -> dict:
    from dataclasses import asdict
    return {**asdict(settings), "model": job.model, "engine": engine, "device": job.device, "dtype": job.dtype,
            "key": "file" if not job.key.source.startswith("env:") else "environment variable"}


if __name__ == "__main__":
    main()
