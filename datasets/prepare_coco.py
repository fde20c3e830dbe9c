#!/usr/bin/env python
"""Lay out the official COCO 2014 / 2017 downloads under $DETECTOR_DATASETS/coco and check them.

    python datasets/prepare_coco.py train2017.zip val2017.zip annotations_trainval2017.zip
    python datasets/prepare_coco.py train2014.zip val2014.zip annotations_trainval2014.zip \
        --minival coco_annotations_minival.tgz

Each zip is recognised by its single top folder (train2014/, val2014/, train2017/, val2017/ or
annotations/), extracted to a hidden ".partial" folder and renamed into place when complete, so an
interrupted run leaves nothing half-written; a re-run skips what is already in place. Members with
absolute paths or ".." are refused. Afterwards every split present is checked: each image the
annotation file lists must exist, and the image count must equal the official one (with
--allow-subset a smaller count is only a warning). --minival installs Detectron's
instances_minival2014.json / instances_valminusminival2014.json (from their tgz or the two json
files) after checking that they split val2014 into disjoint parts covering it.

Bad input ends with one line "prepare_coco.py: error: ..." naming the file, and exit status 1.
"""
import argparse
import json
import logging
import os
import shutil
import sys
import tarfile
import zipfile
import zlib
from typing import Dict, List, Optional, Sequence

from tqdm import tqdm

from detector.data.datasets.builtin import PREDEFINED_COCO_SPLITS, get_datasets_root

PROG = "prepare_coco.py"
logger = logging.getLogger("detector.prepare_coco")

# Images in each official zip (and listed in its instances_*.json)
OFFICIAL_IMAGE_COUNTS = {"train2014": 82783, "val2014": 40504, "train2017": 118287,
                         "val2017": 5000}
# Detectron's split of val2014; its ids come from Detectron's release and cannot be derived
MINIVAL_FILES = {"instances_minival2014.json": 5000, "instances_valminusminival2014.json": 35504}
ANNOTATIONS = "annotations"
ZIP_FOLDERS = (*OFFICIAL_IMAGE_COUNTS, ANNOTATIONS)
# Official zip name -> the folder it must hold
OFFICIAL_ZIP_FOLDERS = {**{f"{split}.zip": split for split in OFFICIAL_IMAGE_COUNTS},
                        "annotations_trainval2014.zip": ANNOTATIONS,
                        "annotations_trainval2017.zip": ANNOTATIONS}


class PreparationError(Exception):
    """Unusable input; the one-line message names the file."""


def check_member_name(archive: str, name: str) -> List[str]:
    """The path components of archive member ``name``; refuses absolute paths and "..", which
    would write outside the destination."""
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (len(parts[0]) == 2 and parts[0][1] == ":") \
            or ".." in parts:
        raise PreparationError(f"{archive}: unsafe member path '{name}' (absolute or with '..'); "
                               f"refusing to extract")
    return [p for p in parts if p not in ("", ".")]


def _open_zip(path: str) -> zipfile.ZipFile:
    if not os.path.isfile(path):
        raise PreparationError(f"{path}: file not found")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise PreparationError(f"{path}: not a readable zip file ({e}); download it again") \
            from None


def _zip_folder(path: str, members: Sequence[zipfile.ZipInfo]) -> str:
    """The single known top folder every member of ``path`` lies in."""
    parts = [check_member_name(path, m.filename) for m in members]
    tops = {p[0] for p in parts if p}
    expected = OFFICIAL_ZIP_FOLDERS.get(os.path.basename(path))
    if len(tops) != 1 or next(iter(tops)) not in ZIP_FOLDERS \
            or (expected and tops != {expected}):
        want = f"{expected}/" if expected else "one of " + ", ".join(f"{f}/" for f in ZIP_FOLDERS)
        found = ", ".join(sorted(f"{t}/" for t in tops)) or "nothing"
        raise PreparationError(f"{path}: expected every member under {want}, found {found} "
                               f"(not an official COCO zip)")
    return tops.pop()


def _extract(path: str, zf: zipfile.ZipFile, members, dest: str) -> None:
    """Write ``members`` under ``dest``, with a progress bar; CRC errors name the member."""
    for info in tqdm(members, desc=f"extracting {os.path.basename(path)}", unit="file",
                     mininterval=1.0):
        target = os.path.join(dest, *check_member_name(path, info.filename))
        if info.is_dir():
            os.makedirs(target, exist_ok=True)
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise PreparationError(f"{path}: corrupt member {info.filename} ({e}); "
                                   f"download it again") from None


def _fresh_partial(coco_dir: str, name: str) -> str:
    partial = os.path.join(coco_dir, f".{name}.partial")
    if os.path.exists(partial):
        logger.info("Removing %s left by an interrupted run", partial)
        shutil.rmtree(partial)
    os.makedirs(partial)
    return partial


def _files_in(folder: str) -> List[str]:
    with os.scandir(folder) as entries:
        return [e.name for e in entries if e.is_file()]


def install_zip(path: str, coco_dir: str) -> str:
    """Extract one official COCO zip into ``coco_dir`` unless already done; returns its folder."""
    with _open_zip(path) as zf:
        members = zf.infolist()
        folder = _zip_folder(path, members)
        files = [m for m in members if not m.is_dir()]
        if folder == ANNOTATIONS:
            _install_annotation_files(path, zf, files, coco_dir)
            return folder
        final = os.path.join(coco_dir, folder)
        if os.path.isdir(final):
            present = len(_files_in(final))
            if present != len(files):
                raise PreparationError(
                    f"{path}: {final} already exists with {present} files but the zip holds "
                    f"{len(files)}; remove the folder to extract again")
            logger.info("%s: %s is complete (%d files), skipping", path, final, present)
            return folder
        partial = _fresh_partial(coco_dir, folder)
        try:
            _extract(path, zf, members, partial)
            os.rename(os.path.join(partial, folder), final)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        logger.info("%s: extracted %d files to %s", path, len(files), final)
        return folder


def _install_annotation_files(path, zf, files, coco_dir) -> None:
    """annotations/ is shared by the 2014 and 2017 zips, so its files are moved in one by one."""
    names = [check_member_name(path, m.filename) for m in files]
    if not any(len(p) == 2 and p[1].startswith("instances_") for p in names):
        raise PreparationError(f"{path}: no annotations/instances_*.json inside "
                               f"(expected annotations_trainval2014.zip or "
                               f"annotations_trainval2017.zip)")
    ann_dir = os.path.join(coco_dir, ANNOTATIONS)
    todo = []
    for info, parts in zip(files, names):
        target = os.path.join(coco_dir, *parts)
        if not os.path.isfile(target):
            todo.append(info)
        elif os.path.getsize(target) != info.file_size:
            raise PreparationError(
                f"{path}: {target} exists with {os.path.getsize(target)} bytes but the zip's copy "
                f"has {info.file_size}; remove it to install the zip's")
    if not todo:
        logger.info("%s: every file is already in %s, skipping", path, ann_dir)
        return
    stem = os.path.splitext(os.path.basename(path))[0]
    partial = _fresh_partial(coco_dir, stem)
    try:
        _extract(path, zf, todo, partial)
        os.makedirs(ann_dir, exist_ok=True)
        for info in todo:
            parts = check_member_name(path, info.filename)
            os.makedirs(os.path.join(coco_dir, *parts[:-1]), exist_ok=True)
            os.replace(os.path.join(partial, *parts), os.path.join(coco_dir, *parts))
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    logger.info("%s: installed %d files in %s", path, len(todo), ann_dir)


class AnnotationImages:
    """Each annotation file's {image id: file name}, parsed once per run (the files are large)."""

    def __init__(self):
        self._cache: Dict[str, Dict[int, str]] = {}

    def __call__(self, json_file: str) -> Dict[int, str]:
        if json_file not in self._cache:
            try:
                with open(json_file, "r", encoding="utf-8") as f:
                    data = json.load(f)
                images = data["images"]
                self._cache[json_file] = {int(im["id"]): str(im["file_name"]) for im in images}
            except (ValueError, KeyError, TypeError) as e:
                raise PreparationError(f"{json_file}: not a COCO annotation file with an "
                                       f"'images' list of {{id, file_name}} ({e!r})") from None
        return self._cache[json_file]


def _check_count(what: str, count: int, official: int, allow_subset: bool) -> None:
    """Error on a count other than the official one; only a warning for a deliberate subset."""
    if count == official:
        return
    message = f"{what} has {count} images, the official release {official}"
    if allow_subset and count < official:
        logger.warning("%s (a subset, allowed by --allow-subset)", message)
        return
    hint = "" if count > official else "; pass --allow-subset if this subset is deliberate"
    raise PreparationError(message + hint)


def check_split(coco_dir: str, split: str, images_of: AnnotationImages,
                allow_subset: bool) -> Optional[int]:
    """Check an image folder against its instances_<split>.json; the image count, or None when
    neither is present. Every listed image must exist; files not listed are only reported."""
    folder = os.path.join(coco_dir, split)
    json_file = os.path.join(coco_dir, ANNOTATIONS, f"instances_{split}.json")
    have_folder, have_json = os.path.isdir(folder), os.path.isfile(json_file)
    if not have_json:
        if have_folder:
            logger.warning("%s: %s is missing; pass annotations_trainval%s.zip", folder,
                           json_file, split[-4:])
        return None
    listed = images_of(json_file)
    if not have_folder:
        logger.warning("%s: image folder %s is missing; pass %s.zip", json_file, folder, split)
        return None
    present = set(_files_in(folder))
    missing = sorted(name for name in listed.values() if name not in present)
    if missing:
        raise PreparationError(f"{folder}: {len(missing)} of the {len(listed)} images listed in "
                               f"{json_file} are missing (first: {missing[0]})")
    unlisted = len(present) - len(set(listed.values()))
    if unlisted:
        logger.warning("%s: %d files are not listed in %s (not used)", folder, unlisted, json_file)
    _check_count(json_file, len(listed), OFFICIAL_IMAGE_COUNTS[split], allow_subset)
    return len(listed)


def _copy_atomically(src_file, target: str) -> None:
    tmp = target + ".partial"
    with open(tmp, "wb") as dst:
        shutil.copyfileobj(src_file, dst, 1 << 20)
    os.replace(tmp, target)


def install_minival(sources: Sequence[str], ann_dir: str) -> None:
    """Copy instances_minival2014.json and instances_valminusminival2014.json into ``ann_dir``
    from Detectron's coco_annotations_minival.tgz or from the two json files."""
    os.makedirs(ann_dir, exist_ok=True)
    if len(sources) == 1 and not sources[0].endswith(".json"):
        path = sources[0]
        if not os.path.isfile(path):
            raise PreparationError(f"{path}: file not found")
        try:
            with tarfile.open(path, "r:*") as tf:
                members = tf.getmembers()
                for m in members:
                    check_member_name(path, m.name)
                found = {os.path.basename(m.name): m for m in members if m.isfile()
                         and os.path.basename(m.name) in MINIVAL_FILES}
                for name in MINIVAL_FILES:
                    if name not in found:
                        raise PreparationError(f"{path}: holds no {name} (expected Detectron's "
                                               f"coco_annotations_minival.tgz)")
                    if not os.path.isfile(os.path.join(ann_dir, name)):
                        _copy_atomically(tf.extractfile(found[name]), os.path.join(ann_dir, name))
        except (tarfile.TarError, zlib.error, EOFError, OSError) as e:
            raise PreparationError(f"{path}: not a readable tar archive ({e})") from None
        return
    by_name = {os.path.basename(p): p for p in sources}
    if sorted(by_name) != sorted(MINIVAL_FILES):
        raise PreparationError(f"--minival {' '.join(sources)}: expected the tgz or the two files "
                               f"{' and '.join(MINIVAL_FILES)}")
    for name, path in by_name.items():
        if not os.path.isfile(path):
            raise PreparationError(f"{path}: file not found")
        target = os.path.join(ann_dir, name)
        if not (os.path.isfile(target) and os.path.samefile(path, target)):
            with open(path, "rb") as src:
                _copy_atomically(src, target)


def check_minival(ann_dir: str, images_of: AnnotationImages, allow_subset: bool) -> bool:
    """Check installed minival files split val2014: subsets of it, disjoint, covering it."""
    paths = {name: os.path.join(ann_dir, name) for name in MINIVAL_FILES}
    if not any(os.path.isfile(p) for p in paths.values()):
        return False
    for path in paths.values():
        if not os.path.isfile(path):
            raise PreparationError(f"{path}: missing; install both minival files with --minival")
    val_json = os.path.join(ann_dir, "instances_val2014.json")
    if not os.path.isfile(val_json):
        raise PreparationError(f"{val_json}: needed to check the minival files; pass "
                               f"annotations_trainval2014.zip")
    val = images_of(val_json)
    mini_path, rest_path = paths.values()
    mini, rest = images_of(mini_path), images_of(rest_path)
    for path, images in ((mini_path, mini), (rest_path, rest)):
        foreign = sorted(i for i, name in images.items() if val.get(i) != name)
        if foreign:
            raise PreparationError(f"{path}: {len(foreign)} images are not in {val_json} "
                                   f"(first id {foreign[0]})")
    overlap = sorted(mini.keys() & rest.keys())
    if overlap:
        raise PreparationError(f"{mini_path} and {rest_path} share {len(overlap)} image ids "
                               f"(first {overlap[0]}); they must be disjoint")
    uncovered = len(val) - len(mini) - len(rest)
    if uncovered:
        message = f"{mini_path} and {rest_path} leave {uncovered} images of {val_json} out"
        if not allow_subset:
            raise PreparationError(message)
        logger.warning("%s (allowed by --allow-subset)", message)
    for (name, official), images in zip(MINIVAL_FILES.items(), (mini, rest)):
        _check_count(paths[name], len(images), official, allow_subset)
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("zips", nargs="*", help="official COCO zips (train2014.zip, val2014.zip, "
                        "annotations_trainval2014.zip, train2017.zip, ...); none: only check")
    parser.add_argument("--minival", nargs="+", default=[], metavar="PATH",
                        help="Detectron's coco_annotations_minival.tgz, or its two json files")
    parser.add_argument("--root", default=None,
                        help="datasets root (default: $DETECTOR_DATASETS, else ./datasets)")
    parser.add_argument("--allow-subset", action="store_true",
                        help="warn instead of failing when a split has fewer images than the "
                             "official release")
    return parser


def prepare(args) -> Dict[str, int]:
    """Install and check; returns {registered dataset name: image count} of the ready ones."""
    coco_dir = os.path.join(args.root or get_datasets_root(), "coco")
    os.makedirs(coco_dir, exist_ok=True)
    for path in args.zips:
        install_zip(path, coco_dir)
    ann_dir = os.path.join(coco_dir, ANNOTATIONS)
    if args.minival:
        install_minival(args.minival, ann_dir)
    images_of = AnnotationImages()
    for split in OFFICIAL_IMAGE_COUNTS:
        check_split(coco_dir, split, images_of, args.allow_subset)
    check_minival(ann_dir, images_of, args.allow_subset)
    root = os.path.dirname(coco_dir)
    ready = {}
    for name, (image_dir, json_rel) in PREDEFINED_COCO_SPLITS.items():
        json_file = os.path.join(root, json_rel)
        if image_dir.startswith("coco/") and os.path.isfile(json_file) \
                and os.path.isdir(os.path.join(root, image_dir)):
            ready[name] = len(images_of(json_file))
    return ready


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        ready = prepare(args)
    except (PreparationError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    for name, count in ready.items():
        logger.info("%s: ready, %d images", name, count)
    if not ready:
        logger.warning("No COCO dataset is complete yet: pass the zips (see datasets/README.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
