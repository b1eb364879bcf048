"""Resampling baselines: the DDPM loss on a class-rebalanced stream (CBDM Table 1's RS and
RS-SQRT, after Mahajan et al. 2018). They change the data, not the objective: no loss piece,
only a resampling mode the pipeline's stream must use (models/data/resampling.py)."""
from __future__ import annotations

from models.methods.base import Method, Needs

RS = Method(name="rs", summary="class-balanced resampling of the training stream (RS)",
            paper="CBDM Table 1 baseline (Mahajan et al. 2018)", needs=lambda opts: Needs(resample="balanced"),
            role="data")
RS_SQRT = Method(name="rs_sqrt", summary="resampling ∝ √n_c (RS-SQRT)",
                 paper="CBDM Table 1 baseline (Mahajan et al. 2018)", needs=lambda opts: Needs(resample="sqrt"),
                 role="data")
