import os
import sys
from pathlib import Path

# Tests import helper modules (tiny_models, hub_server) from this directory.
sys.path.insert(0, str(Path(__file__).parent))
