"""Makes data in the kit's three real formats, for runs without the real datasets.

  python make_data.py --out data/demo            # the embedded default's whole data set

Writers (one per real format, so that made data goes through the same loaders as real data):
  NIGHTS        data.csv + ref/ + distort/ in DreamSim's layout
  tar shards    image-text shards in the webdataset / img2dataset format
  benchmark     zero-shot task folders in CLIP_benchmark's on-disk format
and a small generated world of scenes with known perceptual structure (see DEMO section below).
Imports nothing of the model.
"""
import argparse
import csv
import io
import json
import math
import os
import random
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


# ---------------------------------------------------------------------------------------------------
# NIGHTS writer
# ---------------------------------------------------------------------------------------------------

# (written by the stage-1 issue)


# ---------------------------------------------------------------------------------------------------
# Tar shard writer
# ---------------------------------------------------------------------------------------------------

# (written by the stage-2 issue)


# ---------------------------------------------------------------------------------------------------
# CLIP_benchmark task writer
# ---------------------------------------------------------------------------------------------------

# (written by the evaluation issue)


# ---------------------------------------------------------------------------------------------------
# The demo world
# ---------------------------------------------------------------------------------------------------

# (written by the embedded-default issue)
