"""mofkit: MOF crystal structures -> periodic Lennard-Jones energy grids -> a 3D GAN that makes new ones.

One flat module, in pipeline order:

  1. Downloads        verified HTTP / Google Drive files, NIST-ARPA-E ISODB and MOFX-DB clients
  2. Structures       CIF files and the embedded CoRE MOF 2019 dataset as ase.Atoms
  3. Voxelizer        UFF + probe Lennard-Jones 12-6 energies on 3D grids, Henry coefficient, heat of adsorption
  4. Isotherms        Freundlich / Sips / Langmuir / BET fits, isotherm tables, grid isotherm estimate
  5. Shards           sharded grid datasets, data_manifest.csv, streaming torch dataset
  6. Models           the study's 3D GAN generator and discriminator
  7. Training         LSGAN training with checkpoints that resume exactly, AMP, DDP
  8. Scoring          1-NN two-sample accuracy, memorisation, adsorption-property distances
  9. Pictures         CT-style slice montages, loss curves, property histograms
 10. Inverse          energy / density grid -> atoms -> XYZ
 11. Command line     python mofkit.py ...

Units are in names: energies in kelvin (E/k_B, `_K`), lengths in angstrom (`_A`), pressures in bar.
"""
from __future__ import annotations

import os
import sys
import math
import json
import hashlib
import tempfile
import contextlib
from dataclasses import dataclass, field, asdict
from pathlib import Path

import numpy as np
import torch


# =============================================================================
# 1. Downloads: verified files over HTTP / Google Drive, NIST ISODB, MOFX-DB
# =============================================================================

@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Open a temp file beside `path` and rename it into place on success.

    Readers (and a Colab session that dies mid-write) never see half a file: either the old
    file or the complete new one is there. On any error the temp file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def sha256_file(path, chunk_bytes=1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so large shards never sit in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_bytes), b""):
            h.update(block)
    return h.hexdigest()




# =============================================================================
# 2. Structures: CIF files and the embedded CoRE MOF 2019 dataset
# =============================================================================



# =============================================================================
# 3. Voxelizer: force field, probe energies, grids, Henry coefficient
# =============================================================================



# =============================================================================
# 4. Isotherms: Freundlich, Sips, Langmuir and BET fits; grid isotherm estimate
# =============================================================================



# =============================================================================
# 5. Shards: sharded grid datasets, data_manifest.csv, streaming dataset
# =============================================================================



# =============================================================================
# 6. Models: the study's 3D GAN (after Wu et al. 2016)
# =============================================================================



# =============================================================================
# 7. Training: LSGAN with exact-resume checkpoints, mixed precision, DDP
# =============================================================================



# =============================================================================
# 8. Scoring: 1-NN two-sample accuracy, memorisation, property distances
# =============================================================================



# =============================================================================
# 9. Pictures: CT-style slice montages, loss curves, histograms
# =============================================================================



# =============================================================================
# 10. Inverse: grid -> atoms -> XYZ
# =============================================================================



# =============================================================================
# 11. Command line
# =============================================================================


