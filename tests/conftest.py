"""One torch thread per test process: the CI machine has 2 cores, and a second busy job makes multi-threaded
tiny-tensor kernels 10-100x slower. The project root goes on sys.path so tests import the modules directly."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)
