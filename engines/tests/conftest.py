"""Shared pytest fixtures for the exporter tests: import path, tiny sources and packages."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest

ENGINES = Path(__file__).resolve().parent.parent
REPO = ENGINES.parent
sys.path.insert(0, str(ENGINES))

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

from anomalyclip_ref import TINY  # noqa: E402
from export import Prepared, export_random, prepare  # noqa: E402
from random_weights import write_random_sources  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny CLIP file and prompt checkpoint (seed 0), as files."""
    directory = tmp_path_factory.mktemp("tiny-src")
    return write_random_sources(TINY, 0, directory, "tiny")


@pytest.fixture(scope="session")
def tiny_prep(tiny_sources: tuple[Path, Path]) -> Prepared:
    return prepare(*tiny_sources)


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh tiny package, exported exactly like `export.py --tiny --seed 0 --fp16 --int8`."""
    out = tmp_path_factory.mktemp("pkg") / "tiny"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path, _ = export_random(TINY, 0, out, fp16=True, int8=True)
    return path
