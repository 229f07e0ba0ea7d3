"""Builds a small synthetic tree for each of the 17 official AnomalyCLIP dataset layouts, runs the
OFFICIAL meta.json generator (zqhang/AnomalyCLIP `generate_dataset_json/<name>.py`) on it, and
writes, under tests/fixtures/layouts/<layout>/:

- tree.txt: the tree's files, one path per line, relative to ROOT (image files are tiny images
  whose content does not matter to meta.json; other files are empty unless files/ holds them);
- files/<path>: non-image files with content (the VisA split CSV);
- expected.json: what the official script wrote, unchanged (paths prefixed with `ROOT` where the
  official script prefixes them: it is run with the relative root `ROOT`).

The Rust test (tests/it/layouts.rs) builds the same tree from tree.txt, runs `dataset-meta`, and
compares with expected.json after normalising exactly the documented deliberate differences.

Usage (the official scripts are not vendored: pass a checkout of zqhang/AnomalyCLIP):
    python engines/make_layout_fixtures.py --official /path/to/AnomalyCLIP [--out tests/fixtures/layouts]
visa.py needs pandas < 3 (it indexes rows by position, which pandas 3 rejects); 2.3.3 was used.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp"}

# Official script file (without .py) for each of our layout names.
SCRIPTS = {
    "mvtec": "mvtec", "visa": "visa", "mpdd": "mpdd", "btad": "btad", "sdd": "SDD",
    "dagm": "DAGM", "dtd": "DTD", "head_ct": "head_ct", "brainmri": "brainmri", "br35": "br35",
    "covid": "covid", "isbi": "isbi", "clinicdb": "clinicDB", "colondb": "colonDB",
    "kvasir": "kvasir", "endotect": "endoTect", "tn3k": "tn3k",
}

MVTEC = ["bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
         "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper"]
VISA = ["candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1",
        "pcb2", "pcb3", "pcb4", "pipe_fryum"]
MPDD = ["bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes"]
DTD = ["Woven_001", "Woven_127", "Woven_104", "Stratified_154", "Blotchy_099", "Woven_068",
       "Woven_125", "Marbled_078", "Perforated_037", "Mesh_114", "Fibrous_183", "Matted_069"]


def mvtec_like(classes, normal="good", defect="crack", ext="png", mask_ext="png",
               mask_suffix="_mask"):
    files = []
    for i, c in enumerate(classes):
        files += [f"{c}/train/{normal}/000.{ext}", f"{c}/test/{normal}/000.{ext}",
                  f"{c}/test/{normal}/001.{ext}", f"{c}/test/{defect}/000.{ext}",
                  f"{c}/ground_truth/{defect}/000{mask_suffix}.{mask_ext}"]
        if i == 0:  # a second defect type with two images
            files += [f"{c}/test/hole/000.{ext}", f"{c}/test/hole/001.{ext}",
                      f"{c}/ground_truth/hole/000{mask_suffix}.{mask_ext}",
                      f"{c}/ground_truth/hole/001{mask_suffix}.{mask_ext}"]
    return files, {}


def visa():
    files, rows = [], ["object,split,label,image,mask"]
    for c in VISA:
        n0, n1 = (f"{c}/Data/Images/Normal/{i:04d}.JPG" for i in range(2))
        a0 = f"{c}/Data/Images/Anomaly/000.JPG"
        m0 = f"{c}/Data/Masks/Anomaly/000.png"
        files += [n0, n1, a0, m0]
        rows += [f"{c},train,normal,{n0},", f"{c},test,normal,{n1},", f"{c},test,anomaly,{a0},{m0}"]
    files.append("split_csv/1cls.csv")
    return files, {"split_csv/1cls.csv": "\n".join(rows) + "\n"}


def dagm():
    files = []
    for k in range(1, 11):
        c = f"Class{k}"
        files += [f"{c}/Train/0001.PNG", f"{c}/Train/0002.PNG", f"{c}/Train/Label/0002_label.PNG",
                  f"{c}/Train/Label/Labels.txt", f"{c}/Test/0003.PNG", f"{c}/Test/0004.PNG",
                  f"{c}/Test/0005.PNG", f"{c}/Test/Label/0004_label.PNG",
                  f"{c}/Test/Label/0005_label.PNG", f"{c}/Test/Label/Labels.txt"]
    return files, {}


TREES = {
    "mvtec": lambda: mvtec_like(MVTEC),
    "visa": visa,
    "mpdd": lambda: mvtec_like(MPDD),
    "btad": lambda: mvtec_like(["01", "02", "03"], normal="ok", defect="ko", ext="bmp",
                               mask_suffix=""),
    "sdd": lambda: mvtec_like(["electrical commutators"], defect="bad", ext="jpg",
                              mask_suffix="_label"),
    "dagm": dagm,
    "dtd": lambda: mvtec_like(DTD, defect="bad"),
    "head_ct": lambda: ([f"brain/test/good/{i:03d}.png" for i in range(2)]
                        + [f"brain/test/hemorrhage/{i:03d}.png" for i in range(100, 102)], {}),
    "brainmri": lambda: (["brain_tumor_dataset/no/1 no.jpeg", "brain_tumor_dataset/no/2 no.jpeg",
                          "brain_tumor_dataset/yes/Y1.jpg", "brain_tumor_dataset/yes/Y2.JPG"], {}),
    "br35": lambda: (["no/no0.jpg", "no/no1.jpg", "yes/y0.jpg", "yes/y1.jpg"], {}),
    "covid": lambda: (["NORMAL/Normal-1.png", "NORMAL/Normal-2.png", "COVID/COVID-1.png",
                       "Viral Pneumonia/Viral Pneumonia-1.png"], {}),
    "isbi": lambda: (["skin/test/good/ISIC_0000100.jpg", "skin/test/bad/ISIC_0000003.jpg",
                      "skin/test/bad/ISIC_0000004.jpg",
                      "skin/ISBI2016_ISIC_Part1_Test_GroundTruth/ISIC_0000003_Segmentation.png",
                      "skin/ISBI2016_ISIC_Part1_Test_GroundTruth/ISIC_0000004_Segmentation.png"],
                     {}),
    "clinicdb": lambda: (["images/1.png", "images/2.png", "masks/1.png", "masks/2.png"], {}),
    "colondb": lambda: (["images/1.png", "images/2.png", "masks/1.png", "masks/2.png"], {}),
    "kvasir": lambda: (["images/cju0qkwl35piu0993l0dewei2.jpg", "images/cju0qoxqj9q6s0835b43399p4.jpg",
                        "masks/cju0qkwl35piu0993l0dewei2.jpg", "masks/cju0qoxqj9q6s0835b43399p4.jpg"],
                       {}),
    "endotect": lambda: (["good/n0.jpg", "images/a0.jpg", "images/a1.jpg", "masks/a0.png",
                          "masks/a1.png"], {}),
    "tn3k": lambda: (["test-image/0000.jpg", "test-image/0001.jpg", "test-mask/0000.jpg",
                      "test-mask/0001.jpg"], {}),
}


def build(root: Path, files, contents):
    for rel in files:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if rel in contents:
            p.write_text(contents[rel])
        elif p.suffix.lower() in IMAGE_EXTS:
            Image.new("L", (32, 32), 128).save(p)
        else:
            p.write_bytes(b"")


def load_solver(script: Path):
    spec = importlib.util.spec_from_file_location(script.stem, script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # the scripts only define a class; __main__ is not run
    solvers = [v for v in vars(mod).values()
               if isinstance(v, type) and hasattr(v, "run") and hasattr(v, "CLSNAMES")]
    assert len(solvers) == 1, f"{script}: expected one solver class, found {solvers}"
    return solvers[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official", required=True, type=Path,
                    help="checkout of zqhang/AnomalyCLIP (with generate_dataset_json/)")
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).resolve().parent.parent / "tests/fixtures/layouts")
    args = ap.parse_args()
    gen = args.official / "generate_dataset_json"
    commit = subprocess.run(["git", "-C", str(args.official), "rev-parse", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    for name, make in TREES.items():
        files, contents = make()
        files = sorted(files)
        out = args.out / name
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        (out / "tree.txt").write_text("\n".join(files) + "\n")
        for rel, text in contents.items():
            (out / "files" / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / "files" / rel).write_text(text)
        with tempfile.TemporaryDirectory() as tmp:
            build(Path(tmp) / "ROOT", files, contents)
            solver = load_solver(gen / f"{SCRIPTS[name]}.py")
            cwd = os.getcwd()
            os.chdir(tmp)
            try:
                solver(root="ROOT").run()
            finally:
                os.chdir(cwd)
            shutil.copy(Path(tmp) / "ROOT" / "meta.json", out / "expected.json")
        print(f"{name}: {len(files)} files, generate_dataset_json/{SCRIPTS[name]}.py @ {commit}",
              file=sys.stderr)


if __name__ == "__main__":
    main()
