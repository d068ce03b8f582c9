"""Writing files so that a failure never leaves a half-written one."""

from __future__ import annotations

import fnmatch
import json
import os
import tempfile

from rankfold.errors import RankfoldError


def make_public(path: str) -> None:
    """mkstemp makes owner-only files; give the result the permissions a plain open() would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_json_atomic(path: str | os.PathLike, obj: object) -> None:
    """Write `obj` as JSON to a temporary file beside `path`, then rename it into place."""
    replace_atomically(path, (json.dumps(obj, indent=2) + "\n").encode())


def replace_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it into place. A full disk or
    a read-only directory is a RankfoldError, and `path` is then as it was."""
    path = os.fspath(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".part",
                                   dir=os.path.dirname(os.path.abspath(path)))
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        make_public(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise cannot_write(path, exc) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def cannot_write(path: str, exc: OSError) -> RankfoldError:
    return RankfoldError(f"{path}: cannot write it ({exc.strerror or exc}); it was left as it was")


# -- output paths, checked before any work ----------------------------------------------------
C_EXPORT_MARKER = ".rankfold-export-c"  # lists the files `export-c` wrote into its directory
C_BUILD_OUTPUTS = ("model_test", "model_test.exe")  # what `make host` / run-c add beside them


def is_c_build_output(name: str) -> bool:
    """A file the export's own Makefile builds (`make host`, `make cortex-m CPU=...`)."""
    return name in C_BUILD_OUTPUTS or fnmatch.fnmatchcase(name, "model_*.elf")


def _same(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


def refuse_empty_path(option: str, path: str | None, what: str = "file") -> None:
    """An option given as '' (or blanks) is an error, not 'not given': `--json ''` wrote nothing,
    `--checkpoint ''` kept no checkpoints, and neither said so."""
    from rankfold.errors import RankfoldError

    if path is not None and not path.strip():
        raise RankfoldError(f"{option}: expected a {what} path, got {path!r}")


def check_outputs(inputs: dict[str, str | None], outputs: dict[str, str | None], *, force: bool = False) -> None:
    """Before any work: every output file is none of the inputs and no other output, its
    directory exists, it is not a directory, and an existing file is replaced only with `force`.
    Keys name the options (for the message), values are paths (None: not given)."""
    from rankfold.errors import RankfoldError

    for option, path in outputs.items():
        refuse_empty_path(option, path)
    given_in = {k: v for k, v in inputs.items() if v}
    given_out = {k: v for k, v in outputs.items() if v}
    seen: dict[str, str] = {}
    for option, path in given_out.items():
        for in_option, source in given_in.items():
            if _same(path, source):
                raise RankfoldError(f"{option} {path} is the {in_option} input: rankfold never writes over its inputs; "
                                    "choose another output path")
        for other, earlier in seen.items():
            if _same(path, earlier):
                raise RankfoldError(f"{option} {path} and {other} {earlier} are the same file: give each output "
                                    "its own path")
        seen[option] = path
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise RankfoldError(f"{option} {path}: the directory {directory} does not exist")
        if not os.access(directory, os.W_OK):
            raise RankfoldError(f"{option} {path}: the directory {directory} is not writable")
        if os.path.isdir(path):
            raise RankfoldError(f"{option} {path} is a directory: give a file name")
        if os.path.lexists(path) and not force:
            raise RankfoldError(f"{option} {path} exists: rankfold does not overwrite files unless you pass --force")


def check_output_directory(path: str, inputs: dict[str, str | None], *, force: bool = False) -> None:
    """Before any work, for a directory output (export-c): not the current directory, not holding
    an input, and an existing one only replaced with `force` and only if rankfold wrote everything
    in it (its marker lists the files; build outputs aside)."""
    from rankfold.errors import RankfoldError

    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise RankfoldError(f"{path}: the parent directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise RankfoldError(f"{path}: the parent directory {parent} is not writable")
    if _inside(os.getcwd(), path):
        raise RankfoldError(f"{path} is (or holds) the current directory: export into a new directory, e.g. -o c_model")
    for option, source in inputs.items():
        if source and _inside(source, path):
            raise RankfoldError(f"{path} holds the {option} input {source}: export into a new directory")
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path):
        raise RankfoldError(f"{path} exists and is not a directory")
    entries = set(os.listdir(path))
    if not entries:
        return
    if not force:
        raise RankfoldError(f"{path} exists and is not empty: rankfold does not replace a directory unless you pass "
                            "--force (and then only one that export-c wrote)")
    ours = rankfold_files(path)
    if ours is None:
        raise RankfoldError(f"{path} was not written by rankfold export-c (no {C_EXPORT_MARKER}): not replaced, "
                            "even with --force")
    foreign = sorted(e for e in entries - ours - {C_EXPORT_MARKER} if not is_c_build_output(e))
    if foreign:
        raise RankfoldError(f"{path} holds files rankfold did not write ({', '.join(foreign[:5])}"
                            f"{', ...' if len(foreign) > 5 else ''}): not replaced, even with --force")


def rankfold_files(directory: str) -> set[str] | None:
    """The files the marker of a directory rankfold wrote lists, or None when it has no marker."""
    try:
        with open(os.path.join(directory, C_EXPORT_MARKER)) as handle:
            return {line.strip() for line in handle if line.strip() and not line.startswith("#")}
    except OSError:
        return None


def replace_directory(staging: str, directory: str) -> None:
    """Move the complete `staging` directory to `directory`. An existing `directory` (checked by
    check_output_directory) is first renamed aside, then removed once the new one is in place."""
    import shutil

    if not os.path.lexists(directory):
        os.replace(staging, directory)
        return
    aside = tempfile.mkdtemp(prefix=".rankfold-old-", dir=os.path.dirname(os.path.abspath(directory)))
    os.rmdir(aside)
    os.replace(directory, aside)
    try:
        os.replace(staging, directory)
    except OSError:
        os.replace(aside, directory)  # put the old one back
        raise
    shutil.rmtree(aside, ignore_errors=True)

